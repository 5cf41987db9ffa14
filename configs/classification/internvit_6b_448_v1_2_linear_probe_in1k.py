# Linear probe of InternViT-6B-448px-V1.2 (45 layers) at 448 px: the published recipe of
# linear_probing_intern_vit_6b_448px_v1_2_in1k_448_64gpu.yaml (see internvit_6b_448_linear_probe_in1k.py, V1.5).
_base_ = ['./internvit_6b_448_linear_probe_in1k.py']
model = dict(backbone=dict(pretrained='pretrained/InternViT-6B-448px-V1-2'))
test_cfg = dict(title='InternViT-6B-448px-V1.2 linear probe')
