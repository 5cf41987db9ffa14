# ImageNet-1K at 224 px for a linear probe, with the evaluation sets ReaL, V2, A, R and Sketch.
# Layout: data/imagenet/{train,val}/<wnid>/*.JPEG, data/imagenet/real.json (ReaL), data/imagenetv2/<0..999>/,
# data/imagenet-a/<wnid>/, data/imagenet-r/<wnid>/, data/imagenet-sketch/sketch/<wnid>/.
data_root = 'data/imagenet/'
in1k_classes = data_root + 'train'  # the IN-1K class list: the train folders (or a text file of wnids)
# Stratified part of train held out to choose the sweep's head (never an eval set). Only with model.sweep=True:
# ProbeRunner (default_runtime.py) sets HeldOutSplit(sweep=model.sweep), so the single head trains on all of train.
heldout_fraction = 0.01
train_pipeline = dict(type='ProbeTrainTransform', size=224)  # RandomResizedCrop (bicubic) + flip
eval_pipeline = dict(type='ProbeEvalTransform', size=224)  # resize shorter side to 224 (bicubic) + center crop

in1k_train = dict(type='ImageNetFolder', root=data_root + 'train', name='IN-1K', pipeline=train_pipeline)
in1k_val = dict(type='ImageNetFolder', root=data_root + 'val', classes=in1k_classes, name='IN-1K',
                pipeline=eval_pipeline)
loader = dict(batch_size=128, num_workers=8, persistent_workers=True, collate_fn=dict(type='probe_collate'))

train_dataloader = dict(
    **loader, sampler=dict(type='DefaultSampler', shuffle=True), drop_last=True,  # published: whole batches only
    dataset=dict(type='HeldOutSplit', part='train', fraction=heldout_fraction, dataset=in1k_train))
heldout_dataloader = dict(
    **loader, sampler=dict(type='DefaultSampler', shuffle=False, round_up=False),
    dataset=dict(type='HeldOutSplit', part='heldout', fraction=heldout_fraction,
                 dataset=dict(in1k_train, pipeline=eval_pipeline)))
val_dataloader = dict(**loader, sampler=dict(type='DefaultSampler', shuffle=False), dataset=in1k_val)
val_evaluator = dict(type='ImageNetAccuracy')

# One test run evaluates every set: python tools/test.py CONFIG CHECKPOINT [--cfg-options "test_cfg.only=['V2']"]
test_dataloader = dict(**loader, sampler=dict(type='DefaultSampler', shuffle=False))  # dataset: per set
test_evaluator = dict(type='ImageNetAccuracy')
# (A list of sets: MMEngine pretty-prints a dict of dicts very slowly. `pipeline` applies to every set.)
test_cfg = dict(type='MultiSetTestLoop', pipeline=eval_pipeline, sets=[
    dict(name='IN-1K', dataset=in1k_val),
    dict(name='ReaL', dataset=dict(type='ImageNetReaL', root=data_root + 'val', real_json=data_root + 'real.json',
                                   classes=in1k_classes), metric=dict(type='ImageNetAccuracy', real=True)),
    dict(name='V2', dataset=dict(type='ImageNetV2Folder', classes=in1k_classes,
                                 root='data/imagenetv2/imagenetv2-matched-frequency-format-val')),
    # A and R: 1000-way logits restricted to the published 200-class masks (timm's imagenet_{a,r}_indices.txt);
    # the folders must be exactly those classes.
    dict(name='A', dataset=dict(type='ImageNetFolder', root='data/imagenet-a', classes=in1k_classes, name='A',
                                class_subset='imagenet_a')),
    dict(name='R', dataset=dict(type='ImageNetFolder', root='data/imagenet-r', classes=in1k_classes, name='R',
                                class_subset='imagenet_r')),
    dict(name='Sketch', dataset=dict(type='ImageNetFolder', root='data/imagenet-sketch/sketch',
                                     classes=in1k_classes, name='Sketch')),
])
