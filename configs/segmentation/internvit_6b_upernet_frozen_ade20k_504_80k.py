# Head tuning: frozen InternViT-6B (bf16, no_grad), layers 11/23/35/47 -> pyramid -> UperNet + aux FCN (0.4) on the
# pyramid's x2 level (in_index=1, as published for head tuning; full tuning keeps 2); AdamW 4e-5, wd 0.05;
# published 54.9 mIoU.
_base_ = ['../_base_/models/internvit_6b_upernet.py', '../_base_/datasets/ade20k_504.py',
          '../_base_/default_runtime.py', '../_base_/schedules/schedule_80k.py']
model = dict(auxiliary_head=dict(in_index=1))
