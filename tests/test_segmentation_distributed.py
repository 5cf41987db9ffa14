"""Distributed training through tools/dist_train.sh (torchrun + tools/train.py) with 2 gloo processes on the CPU:
DDP, and FSDP (FlexibleRunner + FSDPStrategy + InternViTBlockFSDP, bf16 blocks, activation checkpointing)."""
import os
import os.path as osp
import re
import socket
import subprocess
import sys

import pytest
import torch

import segmentation  # noqa: F401
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS

from segmentation.testing import QUICKSTART_CONFIG, as_cli, make_tiny_dataset, tiny_run_options

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
ITERS = 6


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return make_tiny_dataset(str(tmp_path_factory.mktemp('seg_dist') / 'synth'), num_train=8, num_val=2, size=112)


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def torchrun_train(config, work_dir, data_root):
    """tools/dist_train.sh CONFIG 2: torchrun with 2 processes, tools/train.py --launcher pytorch."""
    options = as_cli(tiny_run_options(data_root, ITERS, batch_size=2))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore', PYTHON=sys.executable, PORT=str(free_port()))
    proc = subprocess.run(['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), config, '2',
                           '--work-dir', work_dir, '--cfg-options', *options],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return log


def write_config(path, body):
    with open(path, 'w') as f:
        f.write(f'_base_ = [{QUICKSTART_CONFIG!r}]\n{body}')
    return str(path)


def final_miou(log):
    return float(re.findall(r'Iter\(val\) \[\d+/\d+\]\s+aAcc: [\d.]+\s+mIoU: ([\d.]+)', log)[-1])


def test_ddp_two_gloo_processes_keep_ranks_identical(data_root, tmp_path):
    config = write_config(tmp_path / 'ddp.py', "custom_hooks = [dict(type='RankConsistencyHook')]\n")
    log = torchrun_train(config, str(tmp_path / 'work'), data_root)
    assert 'Distributed launcher: pytorch' in log and 'GPU number: 2' in log  # MMEngine's name for world size
    assert f'Iter(train) [{ITERS}/{ITERS}]' in log
    assert re.search(r'RankConsistencyHook: \d+ parameters identical on all 2 ranks', log)
    assert osp.isfile(tmp_path / 'work' / f'iter_{ITERS}.pth')
    assert final_miou(log) >= 0


def test_fsdp_two_gloo_processes_train_and_save_a_full_checkpoint(data_root, tmp_path):
    config = write_config(tmp_path / 'fsdp.py', '''
runner_type = 'FlexibleRunner'
strategy = dict(type='FSDPStrategy', state_dict_cfg='full',
                model_wrapper=dict(type='InternViTBlockFSDP', block_param_dtype='bfloat16'))
model = dict(backbone=dict(grad_checkpointing=True))
''')
    work_dir = tmp_path / 'work'
    log = torchrun_train(config, str(work_dir), data_root)
    assert f'Iter(train) [{ITERS}/{ITERS}]' in log
    assert 'InternViTBlockFSDP: activation checkpointing inside every block unit' in log
    # the layer-decay constructor saw FSDP's wrapped names and still put each block in its own layer group
    # (FSDP shows flat 1-D shards: weight decay must still follow names and owners, not shapes)
    assert re.search(r'\n\s+1\s+0\.6561\s+\S+\s+0\.05\s.*backbone\.encoder\.layers\.0\.attn\.qkv\.weight', log)
    assert re.search(r'\n\s+1\s+0\.6561\s+\S+\s+0\s.*backbone\.encoder\.layers\.0\.', log)
    losses = [float(v) for v in re.findall(r'Iter\(train\) \[\s*\d+/\d+\].*?\sloss: ([\d.]+)', log)]
    assert len(losses) >= ITERS and all(torch.isfinite(torch.tensor(losses)))

    checkpoint = torch.load(work_dir / f'iter_{ITERS}.pth', map_location='cpu', weights_only=False)
    state = checkpoint['state_dict']
    assert not any('_fsdp' in key for key in state)
    assert state['backbone.encoder.layers.0.attn.qkv.weight'].dtype == torch.float32  # fp32 master weights
    cfg = Config.fromfile(config)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg.model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)  # a full, unsharded state dict of the plain model
    assert not torch.equal(initial['backbone.encoder.layers.3.mlp.fc2.weight'],
                           state['backbone.encoder.layers.3.mlp.fc2.weight'])
