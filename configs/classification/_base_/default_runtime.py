# MMEngine runtime for the linear probes (root registries; no mmpretrain).
custom_imports = dict(imports=['mm_adapter', 'classification'], allow_failed_imports=False)
# ProbeRunner ties every HeldOutSplit to the sweep switch: model.sweep=False trains the single head on the whole
# train split (nothing held out); model.sweep=True holds out `heldout_fraction` of it to choose the head.
runner_type = 'ProbeRunner'

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # Probe checkpoints hold the heads and BN only (and the backbone's sha256), so keeping a few is cheap. The best
    # epoch on IN-1K val (the published number) is kept for the plain head and for its EMA, beside the last.
    checkpoint=dict(type='ProbeCheckpointHook', interval=1, max_keep_ckpts=3, save_last=True,
                    save_best=['top1', 'ema_top1'], rule='greater'),
    sampler_seed=dict(type='DistSamplerSeedHook'))
# FeatureCacheHook prepares any CachedFeatures dataset before its loop; HeadEMAHook steps the heads' EMA copies; for
# a sweep, HeadSelectionHook scores every head on `heldout_dataloader` (part of the training split) after each epoch
# and selects the best for prediction.
custom_hooks = [dict(type='FeatureCacheHook'), dict(type='HeadSelectionHook', interval=1),
                dict(type='HeadEMAHook')]

env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
log_processor = dict(by_epoch=True)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
