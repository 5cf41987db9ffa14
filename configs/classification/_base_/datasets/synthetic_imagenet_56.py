# The synthetic ImageNet of tools/make_synthetic_imagenet.py at 56 px (the tiny presets' grid): same structure
# as imagenet_224.py, for tests and the CPU quick start.
data_root = 'data/synthetic_imagenet/'
in1k_classes = data_root + 'classes.txt'
# Stratified part of train held out to choose the sweep's head (never an eval set). Only with model.sweep=True:
# ProbeRunner (default_runtime.py) sets HeldOutSplit(sweep=model.sweep), so the single head trains on all of train.
heldout_fraction = 0.2
train_pipeline = dict(type='ProbeTrainTransform', size=56)
eval_pipeline = dict(type='ProbeEvalTransform', size=56)

in1k_train = dict(type='ImageNetFolder', root=data_root + 'train', classes=in1k_classes, name='IN-1K',
                  pipeline=train_pipeline)
in1k_val = dict(type='ImageNetFolder', root=data_root + 'val', classes=in1k_classes, name='IN-1K',
                pipeline=eval_pipeline)
loader = dict(batch_size=16, num_workers=0, collate_fn=dict(type='probe_collate'))

train_dataloader = dict(
    **loader, sampler=dict(type='DefaultSampler', shuffle=True), drop_last=True,  # published: whole batches only
    dataset=dict(type='HeldOutSplit', part='train', fraction=heldout_fraction, dataset=in1k_train))
heldout_dataloader = dict(
    **loader, sampler=dict(type='DefaultSampler', shuffle=False, round_up=False),
    dataset=dict(type='HeldOutSplit', part='heldout', fraction=heldout_fraction,
                 dataset=dict(in1k_train, pipeline=eval_pipeline)))
val_dataloader = dict(**loader, sampler=dict(type='DefaultSampler', shuffle=False), dataset=in1k_val)
val_evaluator = dict(type='ImageNetAccuracy')

test_dataloader = dict(**loader, sampler=dict(type='DefaultSampler', shuffle=False))
test_evaluator = dict(type='ImageNetAccuracy')
# (A list of sets: MMEngine pretty-prints a dict of dicts very slowly. `pipeline` applies to every set.)
test_cfg = dict(type='MultiSetTestLoop', pipeline=eval_pipeline, sets=[
    dict(name='IN-1K', dataset=in1k_val),
    dict(name='ReaL', dataset=dict(type='ImageNetReaL', root=data_root + 'val', real_json=data_root + 'real.json',
                                   classes=in1k_classes), metric=dict(type='ImageNetAccuracy', real=True)),
    dict(name='V2', dataset=dict(type='ImageNetV2Folder', root=data_root + 'imagenetv2', classes=in1k_classes)),
    dict(name='A', dataset=dict(type='ImageNetFolder', root=data_root + 'imagenet-a', classes=in1k_classes, name='A',
                                class_subset_from_folders=True)),
    dict(name='R', dataset=dict(type='ImageNetFolder', root=data_root + 'imagenet-r', classes=in1k_classes, name='R',
                                class_subset_from_folders=True)),
    dict(name='Sketch', dataset=dict(type='ImageNetFolder', root=data_root + 'sketch', classes=in1k_classes,
                                     name='Sketch')),
])
