# Published ImageNet linear probe of InternViT-6B-224px: concat(cls, mean of patch tokens) of the last layer
# (6400-d) -> SyncBN -> Linear(1000); SGD lr 0.1 per 512, batch 1024 (8 GPUs x 128), 10 epochs, frozen bf16
# backbone. Published top-1: IN-1K 88.2, ReaL 90.4, V2 79.9, A 77.5, R 89.8, Sketch 69.1.
# Sweep switch: --cfg-options model.sweep=True (13 lrs x 4 feature choices in one pass, best head chosen on
# the held-out 1% of train).
_base_ = ['./_base_/default_runtime.py', './_base_/schedule_linear_probe_10e.py',
          './_base_/datasets/imagenet_224.py']

model = dict(
    type='LinearProbe', num_classes=1000, feature='cls_mean', lr=0.1, sweep=False,
    backbone=dict(type='InternViT', preset='internvit_6b_224', pretrained='pretrained/InternViT-6B-224px',
                  frozen=True, dtype='bfloat16'),
    data_preprocessor=dict(type='ProbeDataPreprocessor'))

test_cfg = dict(title='InternViT-6B-224px linear probe',
                reference={'IN-1K': 88.2, 'ReaL': 90.4, 'V2': 79.9, 'A': 77.5, 'R': 89.8, 'Sketch': 69.1})
