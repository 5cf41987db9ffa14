# InternViT-6B + feature pyramid + UperNet (1536 channels) + auxiliary FCN head (weight 0.4), 150 ADE20K classes.
# The backbone runs in bf16 on GPU (tools/train.py turns it to fp32 on the CPU); the heads stay fp32.
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
                  output_format='nchw', frozen=True, dtype=backbone_dtype, drop_path_rate=0.0),
    neck=dict(type='ViTFeaturePyramid', in_channels=3200, scales=(4, 2, 1, 0.5), norm_cfg=norm_cfg),
    decode_head=dict(type='UPerHead', in_channels=[3200] * 4, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                     channels=1536, dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(type='FCNHead', in_channels=3200, in_index=2, channels=256, num_convs=1, concat_input=False,
                        dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg, align_corners=False,
                        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(504, 504), stride=(322, 322)))
