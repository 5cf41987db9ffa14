# CPU quick start and tests: the published probe recipe with a tiny random InternViT on the synthetic ImageNet
# (python tools/make_synthetic_imagenet.py data/synthetic_imagenet). Sweep: --cfg-options model.sweep=True.
_base_ = ['./_base_/default_runtime.py', './_base_/schedule_linear_probe_10e.py',
          './_base_/datasets/synthetic_imagenet_56.py']

model = dict(
    type='LinearProbe', num_classes=10, feature='cls_mean', lr=0.1, sweep=False,
    backbone=dict(type='InternViT', preset='internvit_tiny', pretrained=None, frozen=True, dtype=None),
    data_preprocessor=dict(type='ProbeDataPreprocessor'))

max_epochs = 4
param_scheduler = [dict(type='TimmCosineLR', t_initial=max_epochs, warmup_t=1, by_epoch=True,
                        convert_to_iter_based=True)]
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
default_hooks = dict(logger=dict(interval=10))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
test_cfg = dict(title='tiny InternViT linear probe (synthetic)')
