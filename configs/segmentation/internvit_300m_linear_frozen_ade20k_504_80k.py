# Linear probe with a frozen InternViT-300M-448px (not published; our setting): its last layer (23), the layer
# InternVL-Chat reads, as layer 44 is the last layer of 6B-448px; otherwise the 6B linear-probe recipe.
_base_ = ['./internvit_6b_linear_frozen_ade20k_504_80k.py']
pretrained = 'pretrained/InternViT-300M-448px'  # huggingface-cli download OpenGVLab/InternViT-300M-448px
model = dict(backbone=dict(preset='internvit_300m_448', pretrained=pretrained, out_indices=[23]),
             decode_head=dict(in_channels=1024))
