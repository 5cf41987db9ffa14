# Attention-pooling probe of InternViT-300M-448px at 448 px (16 heads of 64; our setting, nothing published).
_base_ = ['./internvit_300m_448_linear_probe_in1k.py']
model = dict(feature='attention_pooling')
test_cfg = dict(title='InternViT-300M-448px attention-pooling probe')
