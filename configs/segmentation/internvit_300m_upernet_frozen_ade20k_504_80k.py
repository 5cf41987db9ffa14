# UperNet head tuning with a frozen InternViT-300M-448px (not published; our setting): layers 5/11/17/23 (every
# quarter of 24, as 11/23/35/47 for 48), UperNet 1024 channels; otherwise the 6B head-tuning recipe.
_base_ = ['./internvit_6b_upernet_frozen_ade20k_504_80k.py']
pretrained = 'pretrained/InternViT-300M-448px'  # huggingface-cli download OpenGVLab/InternViT-300M-448px
model = dict(backbone=dict(preset='internvit_300m_448', pretrained=pretrained, out_indices=[5, 11, 17, 23]),
             neck=dict(in_channels=1024),
             decode_head=dict(in_channels=[1024] * 4, channels=1024),
             auxiliary_head=dict(in_channels=1024))
