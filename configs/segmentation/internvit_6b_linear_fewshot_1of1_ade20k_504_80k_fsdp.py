# Few-shot ADE20K, full training set (1/1): InternViT-6B fully tuned (drop path 0.4, layer decay 0.95, wd 0.05),
# linear head (BN + 1x1 conv) on layer 47, 80k iterations; published 57.2 mIoU. The smaller subsets inherit this.
# Subsets are deterministic and nested: see segmentation/datasets.py (CheckedADE20KDataset.fraction). Test pipeline as
# published for 1/1: short side 504 (the subsets use the published 2016 x 504 fit instead).
_base_ = ['../_base_/models/internvit_6b_linear.py', '../_base_/datasets/ade20k_504.py',
          '../_base_/default_runtime.py', '../_base_/schedules/schedule_80k.py']
fraction = 1.0
max_iters = 80000
model = dict(backbone=dict(out_indices=[47], frozen=False, dtype=None, drop_path_rate=0.4, grad_checkpointing=True))
train_dataloader = dict(dataset=dict(fraction=fraction, subset_seed=0))
optim_wrapper = dict(use_fsdp=True, paramwise_cfg=dict(layer_decay_rate=0.95))
param_scheduler = [dict(type='PolyLRWithLinearWarmup', power=1.0, eta_min=0.0, warmup_iters=1500, warmup_ratio=1e-6,
                        by_epoch=False, begin=0, end=max_iters)]
train_cfg = dict(max_iters=max_iters)  # evaluation and checkpoints every 1000 iterations, best mIoU kept (base)
runner_type = 'FlexibleRunner'
strategy = dict(type='FSDPStrategy', state_dict_cfg='full',
                model_wrapper=dict(type='InternViTBlockFSDP', block_param_dtype='bfloat16'))
