"""Exact resume under MMEngine's FlexibleRunner with the FSDP strategy (InternViTFSDPStrategy + InternViTBlockFSDP,
bf16 blocks, activation checkpointing), 2 gloo processes on the CPU: every rank's random states and the sampler
position are restored, so a run interrupted after a checkpoint and resumed ends with the weights of an
uninterrupted one; a resume with another model is refused naming the tensors (read from the shards' records,
nothing gathered)."""
import os
import os.path as osp
import subprocess
import sys

import torch
from test_segmentation_distributed import ROOT, free_port

from segmentation.testing import QUICKSTART_CONFIG, make_tiny_dataset

FSDP = '''
runner_type = 'FlexibleRunner'
strategy = dict(type='InternViTFSDPStrategy', state_dict_cfg='full',
                model_wrapper=dict(type='InternViTBlockFSDP', block_param_dtype='bf16'))
model = dict(backbone=dict(grad_checkpointing=True))
'''


def test_fsdp_resume_repeats_an_uninterrupted_run_exactly(tmp_path):
    data_root = make_tiny_dataset(str(tmp_path / 'synth'), num_train=8, num_val=2, size=112)
    config = tmp_path / 'fsdp.py'
    config.write_text(f'_base_ = [{QUICKSTART_CONFIG!r}]\n{FSDP}')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore', PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                           str(free_port()), osp.join(ROOT, 'tests', 'fsdp_resume_driver.py'), str(config),
                           str(tmp_path), data_root], cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert 'terminate called' not in log
    assert 'resumed epoch: 0, iter: 2' in log  # not 3: the best checkpoint's rewrite keeps the iteration

    straight = torch.load(tmp_path / 'straight' / 'iter_4.pth', map_location='cpu', weights_only=False)
    resumed = torch.load(tmp_path / 'interrupted' / 'iter_4.pth', map_location='cpu', weights_only=False)
    rank0, rank1 = resumed['random_states']  # both ranks' (their numpy streams differ: per-rank random crops)
    assert (rank0['numpy']['pos'], rank0['numpy']['key'].tolist()) != (rank1['numpy']['pos'],
                                                                      rank1['numpy']['key'].tolist())
    a, b = straight['state_dict'], resumed['state_dict']
    assert set(a) == set(b)
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f'\nFSDP, 2 ranks: resumed vs uninterrupted: max abs weight difference {worst:.3g}')
    assert worst <= 1e-6

    for rank in (0, 1):  # refused on both ranks, before training, naming a mis-shaped tensor of the full model
        assert (f'RESUME-REFUSED rank {rank}: --resume: the checkpoint' in log)
    assert 'tensors of another shape: auxiliary_head.' in log
