# As published: AdamW lr 4e-5, mmcv's poly policy (power 1, min lr 0, computed from iteration 0) with a linear
# warm-up factor (1500 iterations from 1e-6) on top; evaluation every 1000 iterations, the best mIoU checkpoint kept
# (the published numbers are the best of these evaluations), checkpoints every 1000 iterations, the last 2 kept.
optim_wrapper = dict(
    type='AmpOptimWrapper', dtype='bfloat16',
    optimizer=dict(type='AdamW', lr=4e-5, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='InternViTLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(layer_decay_rate=1.0))  # no decay; no weight decay on norms, biases, layer scale
max_iters = 80000
warmup_iters = 1500
param_scheduler = [dict(type='PolyLRWithLinearWarmup', power=1.0, eta_min=0.0, warmup_iters=warmup_iters,
                        warmup_ratio=1e-6, by_epoch=False, begin=0, end=max_iters)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=1000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000, max_keep_ckpts=2, save_best='mIoU',
                    rule='greater'),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
auto_scale_lr = dict(enable=False, base_batch_size=16)  # published: 8 GPUs x 2 images
