"""Run under torchrun (2 CPU processes, gloo) by tests/test_safety_flexible.py: tools/train.py with a FlexibleRunner
strategy config, in one launch (start-up once): an uninterrupted run, an interrupted one and its resume, and a
resume with another model. Each run gets its own rendezvous port (MASTER_PORT + 1, + 2, ...), as the previous one
ends its process group.

    python -m torch.distributed.run --nproc_per_node 2 --master_port P tests/fsdp_resume_driver.py CONFIG TMP DATA
"""
import os
import os.path as osp
import runpy
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from segmentation.testing import as_cli, tiny_run_options  # noqa: E402

config, tmp, data_root = sys.argv[1:4]
main = runpy.run_path(osp.join(ROOT, 'tools', 'train.py'), run_name='tools_train')['main']
port = int(os.environ['MASTER_PORT'])
os.environ.pop('TORCHELASTIC_USE_AGENT_STORE', None)  # rank 0 serves each run's rendezvous itself (not torchrun)
# The quick-start config as it is (random resize/crop/flip, dropout in both heads), validation and a best checkpoint
# at the checkpoint iteration (MMEngine's FlexibleRunner wrote it with the next iteration's number).
options = tiny_run_options(data_root, 4, batch_size=2, checkpoint_interval=2, **{
    'train_cfg.val_interval': 2, 'model.decode_head.dropout_ratio': 0.1, 'model.auxiliary_head.dropout_ratio': 0.1,
    'default_hooks.checkpoint.max_keep_ckpts': 1})


def train(work_dir, iters, *extra, **changes):
    global port
    port += 1
    os.environ['MASTER_PORT'] = str(port)
    opts = dict(options, **{'train_cfg.max_iters': iters}, **changes)
    return main([config, '--work-dir', osp.join(tmp, work_dir), '--launcher', 'pytorch', *extra,
                 '--cfg-options', *as_cli(opts)])


torch.set_num_threads(1)  # tiny models on a small shared CPU: one thread per process
train('straight', 4)
train('interrupted', 2)
train('interrupted', 4, '--resume')
try:
    train('interrupted', 6, '--resume', **{'model.auxiliary_head.channels': 8})
except RuntimeError as err:  # (tools/train.py has ended the process group)
    print(f'RESUME-REFUSED rank {os.environ["RANK"]}: {err}', flush=True)
