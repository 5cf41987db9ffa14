# The synthetic dataset of tools/make_synthetic_ade20k.py (ADE20K layout, 5 classes, 0 = unlabeled), 112 crops.
dataset_type = 'SyntheticADE20KDataset'
data_root = 'data/synthetic_ade20k'
crop_size = (112, 112)  # a multiple of the patch size 14
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAndCheckAnnotations'),
    dict(type='RandomResize', scale=(168, 168), ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(168, 168), keep_ratio=True),
    dict(type='LoadAndCheckAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8, num_workers=2, persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root,
                 data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=2, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root,
                 data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
# Test-time augmentation (tools/test.py --tta), as in mmseg 1.x: the test scale times each ratio, each plain and
# flipped; SegTTAModel averages the class probabilities of the 12 views.
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_model = dict(type='SegTTAModel')
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug', transforms=[
        [dict(type='Resize', scale=(int(168 * r), int(168 * r)), keep_ratio=True) for r in img_ratios],
        [dict(type='RandomFlip', prob=0.0, direction='horizontal'),
         dict(type='RandomFlip', prob=1.0, direction='horizontal')],
        [dict(type='LoadAndCheckAnnotations')],
        [dict(type='PackSegInputs')]])
]
val_evaluator = dict(type='IoUTableMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
