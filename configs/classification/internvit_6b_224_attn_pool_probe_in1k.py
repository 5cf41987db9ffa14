# Attention-pooling probe of InternViT-6B-224px at 224 px (attn_pooling_probing_intern_vit_6b_224px_in1k_224_64gpu
# .yaml): the published linear-probe recipe with the head attention pooling (query = mean of all tokens, keys and
# values = all tokens, LayerNorm eps 1e-5 on q/k/v inputs, 25 heads of 128, q/k/v bias vectors, projection
# 3200 -> 3200) -> BN(3200) -> Linear(1000). About 89.2 IN-1K (InternVL 2.5 report, Table 14).
_base_ = ['./internvit_6b_224_linear_probe_in1k.py']
model = dict(feature='attention_pooling')
test_cfg = dict(title='InternViT-6B-224px attention-pooling probe', reference=dict(_delete_=True, **{'IN-1K': 89.2}))
