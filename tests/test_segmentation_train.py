"""Training through tools/train.py on the synthetic dataset: learning, evaluation + overlays, resume, frozen
backbone, export of a training checkpoint to the InternVL-Chat vision format."""
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config
from PIL import Image

import segmentation  # noqa: F401
from mm_adapter.runtime import build_runner, prepare_config
from segmentation.testing import QUICKSTART_CONFIG, as_cli, tiny_run_options

from helpers import tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TRAIN_ITERS = 30
TINY_DATASET = dict(num_train=16, num_val=4)  # data_root: tests/conftest.py
pytestmark = pytest.mark.usefixtures('one_thread')


def load_checkpoint(path):
    return torch.load(path, map_location='cpu', weights_only=False)  # written by these tests


@pytest.fixture(scope='module')
def trained_run(data_root, tmp_path_factory):
    """tools/train.py in a subprocess: the tiny quick-start model, 30 iterations of 4 images."""
    work_dir = str(tmp_path_factory.mktemp('seg_train') / 'run')
    options = as_cli(tiny_run_options(data_root, TRAIN_ITERS))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'train.py'), QUICKSTART_CONFIG,
                           '--work-dir', work_dir, '--cfg-options', *options],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checkpoint = osp.join(work_dir, f'iter_{TRAIN_ITERS}.pth')
    assert osp.isfile(checkpoint), os.listdir(work_dir)
    return work_dir, checkpoint, proc.stdout + proc.stderr


def test_tiny_model_learns_and_test_tool_reports_and_draws(trained_run, data_root, tmp_path):
    work_dir, checkpoint, log = trained_run
    assert f'Iter(train) [{TRAIN_ITERS}/{TRAIN_ITERS}]' in log
    # The untrained model (same seed, so the same initial weights as the run) on the same validation images.
    cfg = Config.fromfile(QUICKSTART_CONFIG)
    cfg.merge_from_dict(tiny_run_options(data_root, TRAIN_ITERS))
    prepare_config(cfg, QUICKSTART_CONFIG, work_dir=str(tmp_path / 'untrained'))
    untrained = build_runner(cfg).test()
    show_dir = str(tmp_path / 'overlays')
    trained = tool('test')([QUICKSTART_CONFIG, checkpoint, '--work-dir', work_dir, '--show-dir', show_dir,
                                '--max-overlays', '2', '--cfg-options', *as_cli(tiny_run_options(data_root, 1))])
    print(f'\nvalidation mIoU: untrained {untrained["mIoU"]:.2f}, after {TRAIN_ITERS} iterations '
          f'{trained["mIoU"]:.2f} (aAcc {untrained["aAcc"]:.2f} -> {trained["aAcc"]:.2f})')
    assert trained['mIoU'] > untrained['mIoU'] + 25
    assert trained['mIoU'] > 45
    assert set(trained) >= {'aAcc', 'mIoU', 'mAcc'}
    overlays = sorted(os.listdir(show_dir))
    assert overlays == ['synth_validation_00000.png', 'synth_validation_00001.png']
    image = Image.open(osp.join(data_root, 'images', 'validation', 'synth_validation_00000.jpg'))
    overlay = Image.open(osp.join(show_dir, overlays[0]))
    assert overlay.size == (2 * image.size[0], image.size[1])  # ground truth | prediction
    assert np.array(overlay).std() > 10


def test_training_checkpoint_exports_and_loads_back_as_the_same_backbone(trained_run, tmp_path):
    from backbones import InternViT
    _, checkpoint, _ = trained_run
    out = str(tmp_path / 'exported')
    # the tiny test width (64) does not tell the head count; 6B (3200) and 300M (1024) need no --num-heads
    assert tool('export_to_chat')([checkpoint, out, '--image-size', '112', '--dtype', 'float32',
                                       '--num-heads', '4']) == 0
    exported = InternViT.from_pretrained(out)
    trained = {k[len('backbone.'):]: v for k, v in load_checkpoint(checkpoint)['state_dict'].items()
               if k.startswith('backbone.')}
    state = exported.state_dict()
    assert set(state) == set(trained)
    for name, tensor in trained.items():
        assert torch.equal(state[name], tensor), name
    assert tool('export_to_chat')([checkpoint, out]) == 2  # an existing OUT is refused without --overwrite


def _final_state(work_dir, iters):
    checkpoint = load_checkpoint(osp.join(work_dir, f'iter_{iters}.pth'))
    return checkpoint['meta']['iter'], checkpoint['state_dict']


def _logged_train_iters(runner):
    with open(osp.join(runner.log_dir, 'vis_data', 'scalars.json')) as f:
        return [record['iter'] for record in map(json.loads, f) if 'loss' in record]


def test_resume_matches_an_uninterrupted_run(data_root, tmp_path):
    def train(work_dir, max_iters, *extra):
        options = tiny_run_options(data_root, max_iters, checkpoint_interval=2,
                                   **{'train_cfg.val_interval': 1000, 'param_scheduler.0.end': 2,
                                      'param_scheduler.1.begin': 2, 'param_scheduler.1.end': 8})
        return tool('train')([QUICKSTART_CONFIG, '--work-dir', work_dir, *extra,
                                  '--cfg-options', *as_cli(options)])

    straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
    assert _logged_train_iters(train(straight, 6)) == [1, 2, 3, 4, 5, 6]
    train(interrupted, 2)  # "stopped" after 2 iterations
    with open(osp.join(interrupted, 'last_checkpoint')) as f:
        assert f.read().strip().endswith('iter_2.pth')
    _, halfway = _final_state(interrupted, 2)
    resumed = train(interrupted, 6, '--resume')
    assert _logged_train_iters(resumed) == [3, 4, 5, 6]  # continued, not restarted
    iter_a, state_a = _final_state(straight, 6)
    iter_b, state_b = _final_state(interrupted, 6)
    assert iter_a == iter_b == resumed.iter == 6
    assert set(state_a) == set(state_b)
    moved = 0
    for name in state_a:
        assert torch.allclose(state_a[name].float(), state_b[name].float(), rtol=1e-5, atol=1e-6), name
        moved += not torch.equal(state_a[name], halfway[name])
    assert moved > len(state_a) // 2  # the resumed part really trained
    assert not [f for f in os.listdir(interrupted) if f.endswith('.partial')]  # atomic writes leave nothing behind
    with pytest.raises(FileExistsError, match=r'already holds a run \(latest checkpoint .*iter_6\.pth\); pass '
                                              r'--resume to continue it, --overwrite'):
        train(interrupted, 6)


def test_frozen_backbone_gets_no_gradients_and_stays_bit_identical(data_root, tmp_path):
    cfg = Config.fromfile(QUICKSTART_CONFIG)
    cfg.merge_from_dict(tiny_run_options(data_root, 3, **{'model.backbone.frozen': True}))
    prepare_config(cfg, QUICKSTART_CONFIG, work_dir=str(tmp_path / 'frozen'))
    runner = build_runner(cfg)
    model = runner.model
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.decode_head.state_dict().items()}
    runner.train()

    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, backbone_before[name]), name
    assert any(not torch.equal(t, head_before[k]) for k, t in model.decode_head.state_dict().items())
    in_optimizer = {id(p) for g in runner.optim_wrapper.optimizer.param_groups for p in g['params']}
    assert not any(id(p) in in_optimizer for p in model.backbone.parameters())

    # One more backward by hand: the heads get gradients, the backbone none, and it stays in eval mode.
    model.train()
    assert not model.backbone.training
    batch = model.data_preprocessor(next(iter(runner.train_dataloader)), training=True)
    losses = model.loss(batch['inputs'], batch['data_samples'])
    sum(v for k, v in losses.items() if 'loss' in k).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.decode_head.parameters() if p.requires_grad)


def test_config_formatting_is_memoised_without_changing_it(monkeypatch):
    """build_runner memoises yapf's formatting of the config (the runner formats it for the log, the dump and every
    checkpoint's meta): the same text, formatted once; a changed config is formatted anew."""
    import mmengine.config.config as config_module

    from mm_adapter.runtime import cache_config_formatting
    formatted = []
    original = config_module.FormatCode

    def counting(text, **kwargs):
        formatted.append(text)
        return original(text, **kwargs)

    monkeypatch.setattr(config_module, 'FormatCode', counting)  # restored after the test, memoised or not
    cfg = Config.fromfile(QUICKSTART_CONFIG)
    plain = cfg.pretty_text
    cache_config_formatting()
    assert cfg.pretty_text == plain and cfg.pretty_text == plain
    assert len(formatted) == 2  # before memoising, then once for both calls
    cfg.merge_from_dict({'train_cfg.max_iters': 7})
    assert 'max_iters=7' in cfg.pretty_text and len(formatted) == 3
