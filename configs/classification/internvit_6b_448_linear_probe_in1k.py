# Linear probe of InternViT-6B-448px (V1-2 / V1-5: 45 layers) at 448 px, same recipe as the 224 px probe.
_base_ = ['./_base_/default_runtime.py', './_base_/schedule_linear_probe_10e.py',
          './_base_/datasets/imagenet_448.py']

model = dict(
    type='LinearProbe', num_classes=1000, feature='cls_mean', lr=0.1, sweep=False,
    backbone=dict(type='InternViT', preset='internvit_6b_448', pretrained='pretrained/InternViT-6B-448px-V1-5',
                  frozen=True, dtype='bfloat16'),
    data_preprocessor=dict(type='ProbeDataPreprocessor'))
test_cfg = dict(title='InternViT-6B-448px linear probe')
