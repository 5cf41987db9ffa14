# Few-shot ADE20K, 1/16 of the training images, 5k iterations; published 46.5 mIoU. Otherwise as the 1/1 config.
_base_ = ['./internvit_6b_linear_fewshot_1of1_ade20k_504_80k_fsdp.py']
fraction = 1 / 16
max_iters = 5000
train_dataloader = dict(dataset=dict(fraction=fraction))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters // 10)
default_hooks = dict(checkpoint=dict(interval=max_iters // 10))
