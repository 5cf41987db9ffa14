# Quick start on the CPU: a tiny InternViT (4 layers, width 64, random init) + pyramid + UperNet, fully trained on
# the synthetic dataset; fp32, BN. Slide inference 112/84 and test-time padding exercise the multiple-of-14 rules.
#   bash tools/quickstart.sh   (or: python tools/make_synthetic_ade20k.py && python tools/train.py THIS_CONFIG)
_base_ = ['../_base_/models/internvit_6b_upernet.py', '../_base_/datasets/synthetic_ade20k.py',
          '../_base_/default_runtime.py', '../_base_/schedules/schedule_80k.py']
norm_cfg = dict(type='BN', requires_grad=True)
crop_size = (112, 112)
num_classes = 5
max_iters = 300
model = dict(
    data_preprocessor=dict(size=crop_size),
    # img_size: the position grid trained and stored at the crop's 8x8 (as the 6B configs do at 504: 36x36)
    backbone=dict(preset='internvit_tiny', img_size=112, pretrained=None, out_indices=[0, 1, 2, 3], frozen=False,
                  dtype=None),
    neck=dict(in_channels=64),  # the published pyramid (LayerNorm in the x4 branch)
    decode_head=dict(in_channels=[64] * 4, channels=32, num_classes=num_classes, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=64, channels=16, num_classes=num_classes, norm_cfg=norm_cfg),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(84, 84)))
optim_wrapper = dict(type='OptimWrapper', _delete_=True,
                     optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
                     constructor='InternViTLayerDecayOptimizerConstructor', paramwise_cfg=dict(layer_decay_rate=0.9))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=30),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=30, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(logger=dict(interval=20), checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
env_cfg = dict(cudnn_benchmark=False)
