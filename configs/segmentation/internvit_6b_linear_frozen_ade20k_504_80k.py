# Linear probe: frozen InternViT-6B (bf16, no_grad), features of layer 44, BN + 1x1 conv; published 47.2 mIoU.
_base_ = ['../_base_/models/internvit_6b_linear.py', '../_base_/datasets/ade20k_504.py',
          '../_base_/default_runtime.py', '../_base_/schedules/schedule_80k.py']
optim_wrapper = dict(optimizer=dict(weight_decay=0.0))
