# Linear probe of InternViT-300M-448px at 448 px (2048-d features), same recipe as the 6B probes.
_base_ = ['./_base_/default_runtime.py', './_base_/schedule_linear_probe_10e.py',
          './_base_/datasets/imagenet_448.py']

model = dict(
    type='LinearProbe', num_classes=1000, feature='cls_mean', lr=0.1, sweep=False,
    backbone=dict(type='InternViT', preset='internvit_300m_448', pretrained='pretrained/InternViT-300M-448px',
                  frozen=True, dtype='bfloat16'),
    data_preprocessor=dict(type='ProbeDataPreprocessor'))
test_cfg = dict(title='InternViT-300M-448px linear probe')
