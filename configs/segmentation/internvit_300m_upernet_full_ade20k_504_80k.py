# UperNet full tuning of InternViT-300M-448px (not published; our setting). 300M fits plain DDP, so the standard
# Runner; layer decay 0.9 over 24 layers gives the embeddings about the same lr factor as 0.95 over 48
# (0.9^25 ~ 0.95^49 ~ 0.08); drop path 0.2 as usual for ViT-L-sized models.
_base_ = ['./internvit_300m_upernet_frozen_ade20k_504_80k.py']
model = dict(backbone=dict(frozen=False, dtype=None, drop_path_rate=0.2))
optim_wrapper = dict(paramwise_cfg=dict(layer_decay_rate=0.9))
