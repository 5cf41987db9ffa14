"""Exact resume under MMEngine's FlexibleRunner with the FSDP strategy (InternViTFSDPStrategy + InternViTBlockFSDP,
bf16 blocks, activation checkpointing), 2 gloo processes on the CPU: every rank's random states and the sampler
position are restored, so a run interrupted after a checkpoint and resumed ends with the weights of an
uninterrupted one; a resume with another model is refused naming the tensors (read from the shards' records,
nothing gathered)."""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from test_segmentation_distributed import ROOT, free_port

from segmentation.testing import QUICKSTART_CONFIG

FSDP = '''
runner_type = 'FlexibleRunner'
strategy = dict(type='InternViTFSDPStrategy', state_dict_cfg='full',
                model_wrapper=dict(type='InternViTBlockFSDP', block_param_dtype='bf16'))
model = dict(backbone=dict(grad_checkpointing=True))
'''


def test_fsdp_resume_repeats_an_uninterrupted_run_exactly(data_root, tmp_path):  # data_root: tests/conftest.py
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
    # each Adam state is saved as itself (torch 2.14 on the CPU saved the last one gathered for all of them)
    moments = [s for s in straight['optimizer']['state'].values() if 'exp_avg' in s]
    assert moments and all(not torch.equal(s['exp_avg'], s['exp_avg_sq']) for s in moments if s['exp_avg'].any())
    a, b = straight['state_dict'], resumed['state_dict']
    assert set(a) == set(b)
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f'\nFSDP, 2 ranks: resumed vs uninterrupted: max abs weight difference {worst:.3g}')
    assert worst <= 1e-6

    for rank in (0, 1):  # refused on both ranks, before training, naming a mis-shaped tensor of the full model
        assert (f'RESUME-REFUSED rank {rank}: --resume: the checkpoint' in log)
    assert 'tensors have another shape: auxiliary_head.' in log


def test_deepspeed_resume_continues_the_random_streams_of_every_rank(data_root, tmp_path):
    """ZeRO-3, 2 gloo processes, one launch per run (DeepSpeed keeps process-wide state): the quick-start config with
    its random augmentation, dropout and save_best, resumed from DeepSpeed's own iter_2.pth/ folder. Every rank's
    random streams at the end must equal the uninterrupted run's (with the seed's streams, or rank 0's on both ranks,
    they do not), and so must the weights: measured 0 apart since ZeRO-3 gathers one parameter at a time on the CPU
    (mm_adapter.runtime.gather_zero3_parameters_one_by_one; before, 1.73, nan and 2.6e25 in three runs). The bound
    leaves room for launch-to-launch rounding (6e-5 was once measured between two uninterrupted runs)."""
    pytest.importorskip('deepspeed')
    from test_deepspeed import DEEPSPEED, dist_train

    from segmentation.testing import tiny_run_options
    config = tmp_path / 'deepspeed.py'
    config.write_text(f'_base_ = [{QUICKSTART_CONFIG!r}]\n{DEEPSPEED}')

    def run(work_dir, iters, *extra):
        options = tiny_run_options(data_root, iters, batch_size=2, checkpoint_interval=2, **{
            'train_cfg.val_interval': 2, 'model.decode_head.dropout_ratio': 0.1,
            'model.auxiliary_head.dropout_ratio': 0.1, 'default_hooks.checkpoint.max_keep_ckpts': 1})
        return dist_train(str(config), str(tmp_path / work_dir), options, *extra, tmp=tmp_path)

    run('straight', 3)
    run('interrupted', 2)
    log = run('interrupted', 3, '--resume')
    assert f"Resume checkpoint from {tmp_path / 'interrupted' / 'iter_2.pth'}" in log  # DeepSpeed's folder
    # save_best rewrote iter_2.pth/ after validation; FlexibleRunner used to record iteration 3 in it
    assert 'resumed epoch: 0, iter: 2' in log and 'Iter(train) [3/3]' in log
    a = torch.load(tmp_path / 'straight' / 'weights_iter_3.pth', map_location='cpu', weights_only=False)
    b = torch.load(tmp_path / 'interrupted' / 'weights_iter_3.pth', map_location='cpu', weights_only=False)
    assert len(a['random_states']) == len(b['random_states']) == 2
    for straight, resumed in zip(a['random_states'], b['random_states']):
        assert torch.equal(straight['torch'], resumed['torch']) and straight['python'] == resumed['python']
        assert straight['numpy']['pos'] == resumed['numpy']['pos']
        assert torch.equal(straight['numpy']['key'], resumed['numpy']['key'])
    assert a['random_states'][0]['numpy']['pos'] != a['random_states'][1]['numpy']['pos']  # the ranks' differ
    differences = {k: (a['state_dict'][k].double() - b['state_dict'][k].double()).abs().max().item()
                   for k in a['state_dict']}
    worst = torch.tensor(list(differences.values())).max().item()  # a nan stays nan
    print(f'\nDeepSpeed ZeRO-3, 2 ranks: resumed vs uninterrupted: max abs weight difference {worst:.3g}')
    assert all(d < 1e-3 for d in differences.values()), {k: d for k, d in differences.items() if not d < 1e-3}
