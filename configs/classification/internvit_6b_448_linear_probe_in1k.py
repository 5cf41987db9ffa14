# Linear probe of InternViT-6B-448px-V1.5 (45 layers) at 448 px (linear_probing_intern_vit_6b_448px_v1_5_in1k_448_64gpu
# .yaml), same recipe as the 224 px probe. Other 448px versions: internvit_6b_448_v{1_0,1_2,2_5}_*.py.
_base_ = ['./_base_/default_runtime.py', './_base_/schedule_linear_probe_10e.py',
          './_base_/datasets/imagenet_448.py']

model = dict(
    type='LinearProbe', num_classes=1000, feature='cls_mean', lr=0.1, sweep=False,
    backbone=dict(type='InternViT', preset='internvit_6b_448', pretrained='pretrained/InternViT-6B-448px-V1-5',
                  frozen=True, dtype='bfloat16'),
    data_preprocessor=dict(type='ProbeDataPreprocessor'))
test_cfg = dict(title='InternViT-6B-448px linear probe')
