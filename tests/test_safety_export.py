"""Exports never lose a user's files: --overwrite replaces only a marked previous export that does not hold the
source, a crash between the two renames is repaired, and errors about the source's tensors name the source."""
import os
import runpy
from pathlib import Path

import pytest
import torch

from backbones.arch_config import arch_for_weights
from backbones.atomic import EXPORT_MARKER
from backbones.internvit import InternViT
from backbones.layouts import WeightsError
from backbones.reading import read_weights
from backbones.writing import write_hf

REPO = Path(__file__).resolve().parents[1]


def export_tool(argv):
    return runpy.run_path(str(REPO / 'tools' / 'export_to_chat.py'), run_name='export_tool')['main'](argv)


@pytest.fixture
def run_dir(tmp_path):
    """A training run directory: two MMEngine-style checkpoints (backbone. prefix) and a log."""
    torch.manual_seed(0)
    model = InternViT('internvit_tiny')
    run = tmp_path / 'run'
    run.mkdir()
    for it in (20, 40):
        state = {f'backbone.{k}': v.clone() + it for k, v in model.state_dict().items()}
        torch.save({'meta': {'iter': it}, 'state_dict': state}, run / f'iter_{it}.pth')
    (run / 'last_checkpoint').write_text(str(run / 'iter_40.pth'))
    (run / 'train.log').write_text('log\n')
    return run


def _contents(directory):
    return sorted(p.name for p in Path(directory).iterdir())


ARGS = ['--image-size', '56', '--dtype', 'float32', '--num-heads', '4']


def test_overwrite_never_replaces_the_run_directory_holding_the_source(run_dir, capsys):
    before = _contents(run_dir)
    assert export_tool([str(run_dir / 'iter_40.pth'), str(run_dir), '--overwrite', *ARGS]) == 2
    assert _contents(run_dir) == before  # every checkpoint, the source itself, still there
    err = capsys.readouterr().err
    assert f'refusing to replace {run_dir}: it contains the source {run_dir / "iter_40.pth"}' in err


def test_overwrite_refuses_unmarked_directories_and_files(run_dir, tmp_path, capsys):
    src = str(run_dir / 'iter_40.pth')
    folder = tmp_path / 'my_results'
    folder.mkdir()
    (folder / 'notes.txt').write_text('mine')
    a_file = tmp_path / 'a_file'
    a_file.write_text('mine')
    for target, what in ((folder, 'a directory'), (a_file, 'a file')):
        assert export_tool([src, str(target), '--overwrite', *ARGS]) == 2
        assert f'{target} is {what} that is not a previous export' in capsys.readouterr().err
    assert (folder / 'notes.txt').read_text() == 'mine' and a_file.read_text() == 'mine'


def test_overwrite_replaces_a_previous_export_but_not_one_holding_the_source(run_dir, tmp_path, capsys):
    out = tmp_path / 'exported'
    assert export_tool([str(run_dir / 'iter_20.pth'), str(out), *ARGS]) == 0
    assert (out / EXPORT_MARKER).is_file()
    first = read_weights(out).state_dict
    assert export_tool([str(run_dir / 'iter_40.pth'), str(out), '--overwrite', *ARGS]) == 0
    second = read_weights(out).state_dict
    name = 'encoder.layers.0.mlp.fc1.weight'
    assert torch.allclose(second[name], first[name] + 20)  # the new export replaced the old one
    assert _contents(tmp_path) == ['exported', 'run']  # no temporary or moved-aside directories left
    # an export read as SRC and written over itself: refused, the export kept
    assert export_tool([str(out), str(out), '--overwrite', *ARGS]) == 2
    assert f'refusing to replace {out}: it contains the source {out}; the export is never made in place' \
        in capsys.readouterr().err
    assert torch.equal(read_weights(out).state_dict[name], second[name])


def test_a_crash_between_the_two_renames_is_repaired_by_the_next_run(run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'exported'
    assert export_tool([str(run_dir / 'iter_20.pth'), str(out), *ARGS]) == 0
    old_weights = read_weights(out).state_dict
    real_rename = os.rename

    def crash_on_moving_the_new_one_in(src, dst):
        if Path(src).name.startswith('.exported.tmp-'):
            raise KeyboardInterrupt('killed')
        return real_rename(src, dst)

    monkeypatch.setattr(os, 'rename', crash_on_moving_the_new_one_in)
    with pytest.raises(KeyboardInterrupt):
        export_tool([str(run_dir / 'iter_40.pth'), str(out), '--overwrite', *ARGS])
    monkeypatch.setattr(os, 'rename', real_rename)
    assert not out.exists()  # the state a kill leaves behind
    # the next run (even one that is then refused) puts the previous export back first
    assert export_tool([str(run_dir / 'iter_40.pth'), str(out), *ARGS]) == 2
    assert 'already exists' in capsys.readouterr().err
    restored = read_weights(out).state_dict
    assert all(torch.equal(restored[k], old_weights[k]) for k in old_weights)
    assert _contents(tmp_path) == ['exported', 'run']


def test_export_errors_name_the_source_not_the_output(tmp_path):
    torch.manual_seed(0)
    sd = InternViT('internvit_tiny').state_dict()
    bad = dict(sd)
    bad['encoder.layers.0.mlp.fc1.weight'] = torch.zeros(100, 64)  # layer 0's fc1 is the wrong one
    src = tmp_path / 'model.pth'
    torch.save(bad, src)
    weights = read_weights(src)
    arch = arch_for_weights(weights, num_heads=4)
    assert arch.mlp_dim == 256  # the width of most layers, not of layer 0
    out = tmp_path / 'out'
    with pytest.raises(WeightsError) as err:
        write_hf(weights.state_dict, arch, out, source=str(src))
    message = str(err.value)
    assert message.startswith(f'{src}: 1 tensors have another shape: encoder.layers.0.mlp.fc1.weight: checkpoint '
                              f'(100, 64) vs model (256, 64)')
    assert str(out) not in message and not out.exists()
