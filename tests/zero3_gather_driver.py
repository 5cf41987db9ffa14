"""Run under torchrun (2 CPU processes, gloo) by tests/test_deepspeed.py: a ZeRO-3 engine configured as
``mm_adapter.runtime.adapt_deepspeed_to_cpu`` configures one, whose modules each hold several partitioned
parameters (large first: their gathers finish last), consolidated into a weights file's state dict ROUNDS times.
Prints how many consolidated tensors differ from the fp32 master weights.

    python -m torch.distributed.run --nproc_per_node 2 --master_port P tests/zero3_gather_driver.py ROUNDS
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from torch import nn  # noqa: E402

from mm_adapter.runtime import adapt_deepspeed_to_cpu  # noqa: E402


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.large = nn.Parameter(torch.randn(600, 600))
        self.medium = nn.Parameter(torch.randn(300, 300))
        self.small = nn.Parameter(torch.randn(10))


rounds = int(sys.argv[1])
torch.manual_seed(0)
deepspeed.init_distributed('gloo')
strategy = dict(zero_optimization=dict(stage=3, stage3_gather_16bit_weights_on_model_save=True,
                                       stage3_param_persistence_threshold=0))  # every parameter partitioned
adapt_deepspeed_to_cpu(strategy)  # as tools/train.py on the CPU
model = nn.Sequential(*(Block() for _ in range(4)))
# a torch optimizer, as MMEngine's DeepSpeedOptimWrapper passes one (DeepSpeed's own AdamW would JIT-build an op)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                  config=dict(train_micro_batch_size_per_gpu=1, **strategy))
masters = {name: safe_get_full_fp32_param(p).clone() for name, p in engine.module.named_parameters()}
wrong = 0
for _ in range(rounds):
    state = engine._zero3_consolidated_16bit_state_dict()  # what the weights-only checkpoint writes
    if state is not None:
        wrong += sum(not torch.equal(state[name], master) for name, master in masters.items())
if torch.distributed.get_rank() == 0:
    print(f'consolidated tensors different from the fp32 masters: {wrong} of {rounds * len(masters)}')
