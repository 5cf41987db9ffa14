# Linear probe of InternViT-6B-224px at 448 px (linear_probing_intern_vit_6b_224px_in1k_224to448_64gpu.yaml): the
# 16x16 position grid is resampled once at load to 32x32 (bicubic, cls kept), then the published recipe.
_base_ = ['./_base_/default_runtime.py', './_base_/schedule_linear_probe_10e.py',
          './_base_/datasets/imagenet_448.py']

model = dict(
    type='LinearProbe', num_classes=1000, feature='cls_mean', lr=0.1, sweep=False,
    backbone=dict(type='InternViT', preset='internvit_6b_224', img_size=448,
                  pretrained='pretrained/InternViT-6B-224px', frozen=True, dtype='bfloat16'),
    data_preprocessor=dict(type='ProbeDataPreprocessor'))
test_cfg = dict(title='InternViT-6B-224px at 448 px linear probe')
