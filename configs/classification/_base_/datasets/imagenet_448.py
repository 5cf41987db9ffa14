# ImageNet-1K and the evaluation sets at 448 px: imagenet_224.py with the pipelines resized.
_base_ = ['./imagenet_224.py']
train_pipeline = dict(type='ProbeTrainTransform', size=448)
eval_pipeline = dict(type='ProbeEvalTransform', size=448)
train_dataloader = dict(dataset=dict(dataset=dict(pipeline=train_pipeline)))
heldout_dataloader = dict(dataset=dict(dataset=dict(pipeline=eval_pipeline)))
val_dataloader = dict(dataset=dict(pipeline=eval_pipeline))
test_cfg = dict(pipeline=eval_pipeline)
