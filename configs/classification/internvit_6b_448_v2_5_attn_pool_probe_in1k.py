# Attention-pooling probe of InternViT-6B-448px-V2.5 (45 layers) at 448 px
# (attn_pooling_probing_intern_vit_6b_448px_v2_5_in1k_448_64gpu.yaml).
_base_ = ['./internvit_6b_448_attn_pool_probe_in1k.py']
model = dict(backbone=dict(pretrained='pretrained/InternViT-6B-448px-V2_5'))
test_cfg = dict(title='InternViT-6B-448px-V2.5 attention-pooling probe')
