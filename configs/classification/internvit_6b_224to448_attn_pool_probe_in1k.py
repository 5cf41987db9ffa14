# Attention-pooling probe of InternViT-6B-224px at 448 px
# (attn_pooling_probing_intern_vit_6b_224px_in1k_224to448_64gpu.yaml).
_base_ = ['./internvit_6b_224to448_linear_probe_in1k.py']
model = dict(feature='attention_pooling')
test_cfg = dict(title='InternViT-6B-224px at 448 px attention-pooling probe')
