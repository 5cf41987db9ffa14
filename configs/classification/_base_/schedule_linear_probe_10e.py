# The published probe recipe (InternVL classification/: config.py defaults + linear_probing/*.yaml, as its log
# shows): SGD Nesterov momentum 0.9, no weight decay, lr 0.1 per 512 images (set on the model: model.lr, or
# model.sweep_lrs), gradient norm clipped at 5 (per head), 10 epochs, timm's per-iteration cosine from 0 with a
# 1-epoch linear warm-up; Mixup 0.8 + CutMix 1.0 (switch 0.5, per batch), label smoothing 0.1, soft-target CE;
# EMA of the head(s) 0.998, evaluated and checkpointed beside the plain head(s).
max_epochs = 10
model = dict(mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                        mode='batch'),
             label_smoothing=0.1, ema_decay=0.998)
optim_wrapper = dict(type='OptimWrapper', constructor='LinearProbeOptimWrapperConstructor',
                     optimizer=dict(type='SGD', momentum=0.9, nesterov=True, weight_decay=0.0),
                     clip_grad=dict(max_norm=5.0))
param_scheduler = [dict(type='TimmCosineLR', t_initial=max_epochs, warmup_t=1, warmup_lr_init=0.0, lr_min=0.0,
                        by_epoch=True, convert_to_iter_based=True)]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
# Head lrs are per 512 images; the runner multiplies every head's lr by (GPUs x batch per GPU) / 512.
auto_scale_lr = dict(base_batch_size=512, enable=True)
