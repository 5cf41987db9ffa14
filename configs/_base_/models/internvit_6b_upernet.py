# InternViT-6B + feature pyramid + UperNet (1536 channels) + auxiliary FCN head (1536 channels, layer 35, weight 0.4),
# 150 ADE20K classes, as published. The backbone runs in bf16 on GPU (fp32 on the CPU); the heads stay fp32.
# img_size=504: the 16x16 position grid of the 224px weights is resampled once at load to 36x36, which is then
# trained and stored ([1, 1+1296, 3200], as in the published segmentor files).
norm_cfg = dict(type='SyncBN', requires_grad=True)
pretrained = 'pretrained/InternViT-6B-224px'  # huggingface-cli download OpenGVLab/InternViT-6B-224px --local-dir ...
backbone_dtype = 'bfloat16'
data_preprocessor = dict(
    type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True,
    pad_val=0, seg_pad_val=255, size=(504, 504),
    test_cfg=dict(size_divisor=14))  # test images are padded to a multiple of the patch size
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(type='InternViT', preset='internvit_6b_224', pretrained=pretrained, out_indices=[11, 23, 35, 47],
                  img_size=504, output_format='nchw', frozen=True, dtype=backbone_dtype, drop_path_rate=0.0),
    # x4: ConvTranspose2d, LayerNorm over channels (eps 1e-6), GELU, ConvTranspose2d; x2; x1; x1/2 (as published)
    neck=dict(type='ViTFeaturePyramid', in_channels=3200, scales=(4, 2, 1, 0.5), norm_cfg=dict(type='LN2d', eps=1e-6)),
    decode_head=dict(type='UPerHead', in_channels=[3200] * 4, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                     channels=1536, dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(type='FCNHead', in_channels=3200, in_index=2, channels=1536, num_convs=1, concat_input=False,
                        dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg, align_corners=False,
                        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(504, 504), stride=(322, 322)))
