# Linear probe of InternViT-6B-448px-V2.5 (45 layers) at 448 px: the published recipe of
# linear_probing_intern_vit_6b_448px_v2_5_in1k_448_64gpu.yaml (see internvit_6b_448_linear_probe_in1k.py, V1.5).
_base_ = ['./internvit_6b_448_linear_probe_in1k.py']
model = dict(backbone=dict(pretrained='pretrained/InternViT-6B-448px-V2_5'))
test_cfg = dict(title='InternViT-6B-448px-V2.5 linear probe')
