# One-pass sweep from a feature cache: the 6B-224 backbone runs once over IN-1K train (+ val), features go to
# memory-mapped shards (resumable, manifest-checked), then 13 lrs x 4 feature choices train from disk for
# 10 epochs. No augmentation (a cache cannot hold random crops); the best head is chosen on held-out train data.
_base_ = ['./internvit_6b_224_linear_probe_in1k.py']

model = dict(sweep=True, mixup=None)  # a cache holds summaries, not images to mix (label smoothing and EMA stay)
cache_root = 'work_dirs/feature_cache/internvit_6b_224/'
# Summaries of the last 4 layers (the widest feature choice, cls_mean_last4): 4 x 2 x 3200 floats per image.
cached_train = dict(type='CachedFeatures', cache_dir=cache_root + 'in1k_train', layers=4, dtype='float16',
                    dataset=dict(type='ImageNetFolder', root='data/imagenet/train', name='IN-1K',
                                 pipeline=dict(type='ProbeEvalTransform', size=224)))
train_dataloader = dict(num_workers=4, dataset=dict(dataset=dict(_delete_=True, **cached_train)))
heldout_dataloader = dict(num_workers=4, dataset=dict(dataset=dict(_delete_=True, **cached_train)))
val_dataloader = dict(num_workers=4, dataset=dict(
    _delete_=True, type='CachedFeatures', cache_dir=cache_root + 'in1k_val', layers=4, dtype='float16',
    dataset=dict(type='ImageNetFolder', root='data/imagenet/val', classes='data/imagenet/train', name='IN-1K',
                 pipeline=dict(type='ProbeEvalTransform', size=224))))
