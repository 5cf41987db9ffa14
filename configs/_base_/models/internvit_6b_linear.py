# InternViT-6B + the linear head of the published setting (BatchNorm `decode_head.norm` + 1x1 conv over one layer),
# 150 classes; img_size=504: the position grid is resampled once at load to 36x36 and stored so (as published).
norm_cfg = dict(type='SyncBN', requires_grad=True)
pretrained = 'pretrained/InternViT-6B-224px'  # huggingface-cli download OpenGVLab/InternViT-6B-224px --local-dir ...
backbone_dtype = 'bfloat16'
data_preprocessor = dict(
    type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True,
    pad_val=0, seg_pad_val=255, size=(504, 504), test_cfg=dict(size_divisor=14))
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(type='InternViT', preset='internvit_6b_224', pretrained=pretrained, out_indices=[44],
                  img_size=504, output_format='nchw', frozen=True, dtype=backbone_dtype, drop_path_rate=0.0),
    decode_head=dict(type='LinearBNHead', in_channels=3200, in_index=0, num_classes=150, dropout_ratio=0.0,
                     norm_cfg=norm_cfg, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(504, 504), stride=(322, 322)))
