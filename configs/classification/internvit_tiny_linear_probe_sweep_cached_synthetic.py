# The cached one-pass sweep of internvit_6b_224_linear_probe_sweep_cached_in1k.py, tiny and synthetic (CPU).
_base_ = ['./internvit_tiny_linear_probe_synthetic.py']

model = dict(sweep=True, mixup=None)  # a cache holds summaries, not images to mix (label smoothing and EMA stay)
cache_root = 'work_dirs/feature_cache/internvit_tiny_synthetic/'
cached_train = dict(type='CachedFeatures', cache_dir=cache_root + 'in1k_train', layers=4, shard_size=64,
                    extract_batch_size=32, extract_num_workers=0,
                    dataset=dict(type='ImageNetFolder', root='data/synthetic_imagenet/train',
                                 classes='data/synthetic_imagenet/classes.txt', name='IN-1K',
                                 pipeline=dict(type='ProbeEvalTransform', size=56)))
train_dataloader = dict(dataset=dict(dataset=dict(_delete_=True, **cached_train)))
heldout_dataloader = dict(dataset=dict(dataset=dict(_delete_=True, **cached_train)))
val_dataloader = dict(dataset=dict(
    _delete_=True, type='CachedFeatures', cache_dir=cache_root + 'in1k_val', layers=4, shard_size=64,
    extract_batch_size=32, extract_num_workers=0,
    dataset=dict(type='ImageNetFolder', root='data/synthetic_imagenet/val',
                 classes='data/synthetic_imagenet/classes.txt', name='IN-1K',
                 pipeline=dict(type='ProbeEvalTransform', size=56))))
