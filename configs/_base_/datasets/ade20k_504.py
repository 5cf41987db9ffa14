# ADE20K (ADEChallengeData2016), 504x504 crops (a multiple of InternViT's patch size 14), 2 images per GPU.
dataset_type = 'CheckedADE20KDataset'
data_root = 'data/ade/ADEChallengeData2016'
crop_size = (504, 504)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAndCheckAnnotations'),
    dict(type='RandomResize', scale=(2016, 504), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
# As published (linear probe, head and full tuning, few-shot 1/1): short side to 504, then each side to a multiple
# of 14 (a resize, not padding). The annotation is loaded after resizing: metrics are at the original size.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeShortSide', size=504),
    dict(type='ResizeToMultiple', size_divisor=14),
    dict(type='LoadAndCheckAnnotations'),
    dict(type='PackSegInputs'),
]
# As published for the few-shot subsets 1/2 ... 1/16: fit into 2016 x 504 (keeping the aspect ratio), multiple of 14.
subset_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2016, 504), keep_ratio=True),
    dict(type='ResizeToMultiple', size_divisor=14),
    dict(type='LoadAndCheckAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=4, persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root,
                 data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=4, persistent_workers=True,
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
        [dict(type='Resize', scale=(int(2048 * r), int(504 * r)), keep_ratio=True) for r in img_ratios],
        [dict(type='RandomFlip', prob=0.0, direction='horizontal'),
         dict(type='RandomFlip', prob=1.0, direction='horizontal')],
        [dict(type='LoadAndCheckAnnotations')],
        [dict(type='PackSegInputs')]])
]
val_evaluator = dict(type='IoUTableMetric', iou_metrics=['mIoU'])  # prints aAcc, mIoU, mAcc and the per-class table
test_evaluator = val_evaluator
