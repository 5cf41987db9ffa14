# Attention-pooling probe of InternViT-6B-448px-V1.5 (45 layers) at 448 px
# (attn_pooling_probing_intern_vit_6b_448px_v1_5_in1k_448_64gpu.yaml): the linear probe's recipe, head =
# attention pooling (mean-of-tokens query, 25 heads) -> BN -> Linear. Trains on images (no summary cache).
_base_ = ['./internvit_6b_448_linear_probe_in1k.py']
model = dict(feature='attention_pooling')
test_cfg = dict(title='InternViT-6B-448px-V1.5 attention-pooling probe')
