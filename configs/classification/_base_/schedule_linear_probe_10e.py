# Published linear-probe schedule: SGD momentum 0.9, no weight decay, lr 0.1 per 512 images (set on the model:
# model.lr, or model.sweep.lrs), 10 epochs with 1 linear warmup epoch, then cosine to 0.
optim_wrapper = dict(type='OptimWrapper', constructor='LinearProbeOptimWrapperConstructor',
                     optimizer=dict(type='SGD', momentum=0.9, weight_decay=0.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=1, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=9, eta_min=0.0, by_epoch=True, begin=1, end=10,
         convert_to_iter_based=True),
]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=10, val_interval=1)
val_cfg = dict(type='ValLoop')
# Head lrs are per 512 images; the runner multiplies every head's lr by (GPUs x batch per GPU) / 512.
auto_scale_lr = dict(base_batch_size=512, enable=True)
