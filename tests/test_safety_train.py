"""What training keeps safe (tools/train.py on the tiny quick-start config, a few iterations): rotation only after
the new checkpoint is complete, the work-dir lock, no continuation of an overwritten run, load_from never fully
unpickled, an exact resume, and refusals as clear errors before training starts."""
import logging
import os
import os.path as osp
import runpy
import socket
import subprocess
import sys
import time

import pytest
import torch

import segmentation  # noqa: F401
from backbones.layouts import WeightsError
from mm_adapter import run_safety
from mm_adapter.atomic_io import AtomicLocalBackend
from mm_adapter.run_safety import LOCK_NAME, WorkDirLockedError, _process_start
from segmentation.testing import QUICKSTART_CONFIG, as_cli, tiny_run_options

from helpers import tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


pytestmark = pytest.mark.usefixtures('one_thread')  # data_root: tests/conftest.py


def train(data_root, work_dir, iters, *extra, entry='main', **options):
    opts = tiny_run_options(data_root, iters, batch_size=2, checkpoint_interval=1,
                            **{'default_hooks.checkpoint.max_keep_ckpts': 1, 'train_cfg.val_interval': 1000,
                               'param_scheduler.0.end': 1, 'param_scheduler.1.begin': 1,
                               'param_scheduler.1.end': 8})
    opts.update(options)
    return tool('train', entry)([QUICKSTART_CONFIG, '--work-dir', str(work_dir), *extra, '--cfg-options',
                                 *as_cli(opts)])


def pointer(work_dir):
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def checkpoints(work_dir):
    """The rotated iteration checkpoints (``save_best`` keeps its own best_*.pth beside them)."""
    return sorted(f for f in os.listdir(work_dir) if f.startswith('iter_') and f.endswith('.pth'))


# ------------------------------------------------------------------------------------------------- item 2
def test_a_kill_while_writing_a_checkpoint_keeps_the_previous_one(data_root, tmp_path, monkeypatch):
    work_dir = tmp_path / 'run'
    real_put = AtomicLocalBackend.put

    def killed_writing_iter_2(self, obj, filepath):
        if str(filepath).endswith('iter_2.pth'):
            raise KeyboardInterrupt('killed while writing')
        return real_put(self, obj, filepath)

    monkeypatch.setattr(AtomicLocalBackend, 'put', killed_writing_iter_2)
    with pytest.raises(KeyboardInterrupt):
        train(data_root, work_dir, 3)  # max_keep_ckpts=1: iter_1 is the one to be rotated out
    monkeypatch.setattr(AtomicLocalBackend, 'put', real_put)
    assert checkpoints(work_dir) == ['iter_1.pth']
    assert pointer(work_dir) == str(work_dir / 'iter_1.pth')
    runner = train(data_root, work_dir, 3, '--resume')
    assert runner.iter == 3 and checkpoints(work_dir) == ['iter_3.pth']  # rotated once the new one was complete
    assert pointer(work_dir) == str(work_dir / 'iter_3.pth')
    assert not osp.exists(work_dir / LOCK_NAME)  # released at the end


def test_a_failed_write_of_a_new_best_checkpoint_keeps_the_previous_best(data_root, tmp_path, monkeypatch):
    from mmengine.hooks import CheckpointHook
    work_dir = tmp_path / 'run'
    monkeypatch.setitem(CheckpointHook.rule_map, 'greater', lambda new, best: True)  # every evaluation is a new best
    real_put = AtomicLocalBackend.put

    def killed_writing_best_2(self, obj, filepath):
        if str(filepath).endswith('best_mIoU_iter_2.pth'):
            raise KeyboardInterrupt('killed while writing')
        return real_put(self, obj, filepath)

    best = {'default_hooks.checkpoint.save_best': 'mIoU', 'train_cfg.val_interval': 1}
    monkeypatch.setattr(AtomicLocalBackend, 'put', killed_writing_best_2)
    with pytest.raises(KeyboardInterrupt):
        train(data_root, work_dir, 3, **best)
    monkeypatch.setattr(AtomicLocalBackend, 'put', real_put)
    assert sorted(f for f in os.listdir(work_dir) if f.startswith('best_')) == ['best_mIoU_iter_1.pth']

    runner = train(data_root, work_dir, 3, '--resume', **best)
    assert runner.iter == 3
    # the previous best removed only once the new one was written; the run's last checkpoint names the new one
    assert sorted(f for f in os.listdir(work_dir) if f.startswith('best_')) == ['best_mIoU_iter_3.pth']
    last = torch.load(pointer(work_dir), map_location='cpu', weights_only=False)
    assert last['message_hub']['runtime_info']['best_ckpt'] == str(work_dir / 'best_mIoU_iter_3.pth')


# ------------------------------------------------------------------------------------------------- item 3
@pytest.fixture
def other_process():
    proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
    time.sleep(0.2)
    yield proc
    proc.kill()
    proc.wait()


def _write_lock(work_dir, pid, host=None, start=None):
    os.makedirs(work_dir, exist_ok=True)
    import json
    with open(osp.join(work_dir, LOCK_NAME), 'w') as f:
        json.dump({'pid': pid, 'host': host or socket.gethostname(), 'started': '2026-01-01 00:00:00',
                   'process_start': start, 'command': 'tools/train.py first-run'}, f)


def test_a_second_run_is_refused_naming_the_first_and_a_stale_lock_is_reported(data_root, tmp_path, other_process,
                                                                              capsys, monkeypatch):
    work_dir = tmp_path / 'run'
    _write_lock(work_dir, other_process.pid, start=_process_start(other_process.pid))
    with pytest.raises(WorkDirLockedError, match=rf'is in use by another run: process {other_process.pid} on host '
                                                 rf'{socket.gethostname()} \(started 2026-01-01 00:00:00: '
                                                 r'tools/train.py first-run\)'):
        train(data_root, work_dir, 1)
    assert train(data_root, work_dir, 1, entry='cli') == 2  # the command line: one line, no traceback
    err = capsys.readouterr().err.strip()
    assert err.startswith('train.py: error: work dir') and '\n' not in err and 'Traceback' not in err
    assert not osp.exists(work_dir / 'last_checkpoint')  # nothing was written

    other_process.kill()
    other_process.wait()  # the lock's owner is gone: the lock is stale, reported and taken over
    reports = []
    monkeypatch.setattr(run_safety, 'print_log', lambda msg, **kw: reports.append((msg, kw.get('level'))))
    runner = train(data_root, work_dir, 1)
    assert runner.iter == 1
    assert [level for msg, level in reports if f'stale lock {work_dir / LOCK_NAME} of process '
            f'{other_process.pid} on host {socket.gethostname()}' in msg] == [logging.WARNING]
    assert not osp.exists(work_dir / LOCK_NAME)


def test_a_lock_from_another_host_is_refused_with_what_to_delete(data_root, tmp_path):
    work_dir = tmp_path / 'run'
    _write_lock(work_dir, 12345, host='node-that-is-not-this-one')
    with pytest.raises(WorkDirLockedError, match=rf'cannot be checked from this host; if it has stopped, delete '
                                                 rf'{work_dir / LOCK_NAME}'):
        train(data_root, work_dir, 1)


def test_resume_never_continues_the_run_that_overwrite_replaced(data_root, tmp_path, monkeypatch):
    work_dir = tmp_path / 'run'
    train(data_root, work_dir, 1)  # the old run: iter_1.pth, last_checkpoint
    from mmengine.runner import IterBasedTrainLoop

    def killed(self, data_batch):
        raise KeyboardInterrupt('killed before its first checkpoint')

    monkeypatch.setattr(IterBasedTrainLoop, 'run_iter', killed)
    with pytest.raises(KeyboardInterrupt):
        train(data_root, work_dir, 2, '--overwrite')
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match=rf'--resume: nothing to resume in {work_dir} \(no last_checkpoint\)'):
        train(data_root, work_dir, 2, '--resume')


def test_resume_refuses_a_last_checkpoint_naming_a_missing_file(data_root, tmp_path):
    work_dir = tmp_path / 'run'
    train(data_root, work_dir, 1)
    os.unlink(work_dir / 'iter_1.pth')  # e.g. left by an older version's rotation
    with pytest.raises(FileNotFoundError, match=rf'last_checkpoint names {work_dir / "iter_1.pth"}, which does not '
                                                r'exist'):
        train(data_root, work_dir, 2, '--resume')


# ------------------------------------------------------------------------------------------------- item 5
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_load_from_inside_the_work_dir_is_never_fully_unpickled(data_root, tmp_path):
    work_dir = tmp_path / 'run'
    work_dir.mkdir()
    marker = tmp_path / 'payload_ran'
    evil = work_dir / 'evil.pth'
    with open(evil, 'wb') as f:
        torch.save({'state_dict': {}, 'x': _Payload(str(marker))}, f)
    # load_from goes through strict loading's weights-only reader (mm_adapter.strict_loading), wherever the file is
    with pytest.raises(WeightsError, match=f'refused to load {evil}: it pickles objects that weights_only=True'):
        train(data_root, work_dir, 1, load_from=str(evil))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------- item 6
def test_resume_repeats_an_uninterrupted_run_exactly(data_root, tmp_path):
    # The quick-start config as it is: random resize/crop/flip, dropout in both heads, validation every 2 iterations.
    options = {'model.decode_head.dropout_ratio': 0.1, 'model.auxiliary_head.dropout_ratio': 0.1,
               'train_cfg.val_interval': 2, 'default_hooks.checkpoint.interval': 2}
    straight = train(data_root, tmp_path / 'straight', 4, **options)
    train(data_root, tmp_path / 'interrupted', 2, **options)
    resumed = train(data_root, tmp_path / 'interrupted', 4, '--resume', **options)
    assert straight.iter == resumed.iter == 4
    a = torch.load(tmp_path / 'straight' / 'iter_4.pth', map_location='cpu', weights_only=False)['state_dict']
    b = torch.load(tmp_path / 'interrupted' / 'iter_4.pth', map_location='cpu', weights_only=False)['state_dict']
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f'\nresumed vs uninterrupted: max abs weight difference {worst:.3g}')
    assert worst <= 1e-6


# ------------------------------------------------------------------------------------------------- items 8, 9
def test_resume_with_another_model_names_the_differing_tensors(data_root, tmp_path):
    work_dir = tmp_path / 'run'
    train(data_root, work_dir, 1)
    with pytest.raises(RuntimeError, match=r'--resume: the checkpoint .* was written by another model than this '
                                           r'config builds: .*tensors have another shape: auxiliary_head\.'):
        train(data_root, work_dir, 2, '--resume', **{'model.auxiliary_head.channels': 8})


def test_config_mistakes_stop_the_run_before_training(data_root, tmp_path):
    with pytest.raises(ValueError, match=r"--cfg-options: default_hooks.checkpoint.intervall=1: "
                                         r"default_hooks.checkpoint \(CheckpointHook\) takes no argument 'intervall'; "
                                         r"did you mean 'interval'\?"):
        train(data_root, tmp_path / 'a', 1, **{'default_hooks.checkpoint.intervall': 1})
    assert not osp.exists(tmp_path / 'a')  # refused before anything was written
    with pytest.raises(ValueError, match=r"model.backbone.nonexistent_key=3: model.backbone \(InternViT\) takes no "
                                         r"argument 'nonexistent_key'; it takes attn_impl, .*depth"):
        train(data_root, tmp_path / 'a', 1, **{'model.backbone.nonexistent_key': 3})
    with pytest.raises(ValueError, match=r"train_cfg.max_iter=1: train_cfg \(IterBasedTrainLoop\) takes no argument "
                                         r"'max_iter'; did you mean 'max_iters'\?"):
        train(data_root, tmp_path / 'a', 1, **{'train_cfg.max_iter': 1})
    with pytest.raises(ValueError, match=r"--cfg-options: max_iters=5: 'max_iters' is not read by the runner; .* "
                                         r'\(set train_cfg.max_iters'):
        train(data_root, tmp_path / 'b', 1, **{'max_iters': 5})
    # the same typo in a config file: the hook refuses it when built, before training
    with pytest.raises(TypeError, match=r'default_hooks.checkpoint: unknown argument\(s\) intervall; '
                                        r'CheckpointHook takes'):
        run_safety.SafeCheckpointHook(interval=1, intervall=1)


def test_cfg_options_check_accepts_what_is_read(data_root):
    from mmengine.config import Config
    cfg = Config.fromfile(QUICKSTART_CONFIG)
    run_safety.check_cfg_options(cfg, {  # existing keys, new keys a type takes, a type set with its arguments
        'train_cfg.max_iters': 5, 'model.backbone.depth': 2, 'default_hooks.checkpoint.out_dir': '/tmp/x',
        'param_scheduler.1.end': 8, 'optim_wrapper.optimizer.eps': 1e-6, 'model.decode_head.anything': 1,
        'model.neck.type': 'Feature2Pyramid', 'model.neck.rescales': [4, 2, 1, 0.5]})
    with pytest.raises(ValueError, match=r"param_scheduler.1.ends=8: param_scheduler.1 \(PolyLR\) takes no "
                                         r"argument 'ends'; did you mean 'end'\?"):
        run_safety.check_cfg_options(cfg, {'param_scheduler.1.ends': 8})
    # the project's own checkpoint hook named in a config takes CheckpointHook's arguments (it passes them on)
    cfg.default_hooks.checkpoint = dict(type='SafeCheckpointHook', interval=5)
    run_safety.check_cfg_options(cfg, {'default_hooks.checkpoint.max_keep_ckpts': 2})
    with pytest.raises(ValueError, match=r"default_hooks.checkpoint.max_keep_ckpt=2: .*SafeCheckpointHook.*"
                                         r"did you mean 'max_keep_ckpts'"):
        run_safety.check_cfg_options(cfg, {'default_hooks.checkpoint.max_keep_ckpt': 2})


def test_test_tool_says_a_directory_is_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match=f'checkpoint {tmp_path} is a directory, not a checkpoint file'):
        tool('test')([QUICKSTART_CONFIG, str(tmp_path)])


def test_linear_probe_resume_repeats_an_uninterrupted_run_exactly(tmp_path, monkeypatch, private_hash_cache):
    """The tiny probe (Mixup/CutMix, random crops, EMA): 2 epochs straight vs 1 epoch, then --resume to 2."""
    config = osp.join(ROOT, 'configs', 'classification', 'internvit_tiny_linear_probe_synthetic.py')
    runpy.run_path(osp.join(ROOT, 'tools', 'make_synthetic_imagenet.py'))['main'](
        [str(tmp_path / 'data' / 'synthetic_imagenet'), '--classes', '4', '--train-per-class', '8',
         '--val-per-class', '2', '--variant-per-class', '1', '--subset-classes', '2', '--size', '56'])
    monkeypatch.chdir(tmp_path)  # the config's relative data root

    def probe(work_dir, epochs, *extra):
        return tool('train')([config, '--work-dir', str(work_dir), *extra, '--cfg-options', 'model.num_classes=4',
                              f'train_cfg.max_epochs={epochs}', 'train_cfg.val_interval=1',
                              'default_hooks.logger.interval=1'])

    probe(tmp_path / 'straight', 2)
    probe(tmp_path / 'interrupted', 1)
    probe(tmp_path / 'interrupted', 2, '--resume')
    a = torch.load(tmp_path / 'straight' / 'epoch_2.pth', map_location='cpu', weights_only=False)['state_dict']
    b = torch.load(tmp_path / 'interrupted' / 'epoch_2.pth', map_location='cpu', weights_only=False)['state_dict']
    assert set(a) == set(b)
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f'\nprobe resumed vs uninterrupted: max abs difference {worst:.3g}')
    assert worst <= 1e-6


# ------------------------------------------------------------------------------------------------- item 7
def test_a_truncated_checkpoint_is_named_on_resume_and_as_load_from(data_root, tmp_path):
    from mm_adapter.compat import CorruptCheckpointError
    work_dir = tmp_path / 'run'
    train(data_root, work_dir, 1)
    checkpoint = work_dir / 'iter_1.pth'
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:len(data) // 2])  # a copy cut short
    with pytest.raises(CorruptCheckpointError, match=f'cannot read checkpoint {checkpoint}: the file is corrupt or '
                                                     'truncated'):
        train(data_root, work_dir, 2, '--resume')
    with pytest.raises(WeightsError, match=f'cannot read {checkpoint}: the file is corrupt, truncated'):
        train(data_root, tmp_path / 'other', 1, load_from=str(checkpoint))


def test_a_corrupt_annotation_png_is_named(tmp_path):
    import numpy as np
    from PIL import Image

    from segmentation.datasets import LoadAndCheckAnnotations
    png = tmp_path / 'ann.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 5, (64, 64), dtype=np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:-200])  # truncated
    transform = LoadAndCheckAnnotations(num_classes=5)
    with pytest.raises(OSError, match=f'cannot read annotation {png}: the file is corrupt, truncated or not an '
                                      'image'):
        transform({'seg_map_path': str(png), 'reduce_zero_label': False, 'seg_fields': [], 'ori_shape': (64, 64)})
