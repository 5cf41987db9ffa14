"""The published linear-probe head: BatchNorm + 1x1 convolution over the backbone features."""
from __future__ import annotations

from mmcv.cnn import build_norm_layer
from mmseg.models.decode_heads.decode_head import BaseDecodeHead

from ._registry import register_everywhere


@register_everywhere('MODELS')
class LinearBNHead(BaseDecodeHead):
    """BatchNorm over the input features, then mmseg's ``cls_seg`` (dropout + 1x1 conv to the classes).

    mmseg's FCNHead with ``num_convs=0`` lacks the norm, so this head only adds it. ``channels`` equals the input
    channels (the sum over inputs with ``input_transform='resize_concat'``) and may be left out.
    """

    def __init__(self, in_channels, channels: int | None = None, **kwargs):
        total = sum(in_channels) if isinstance(in_channels, (list, tuple)) else in_channels
        if channels is None:
            channels = total
        elif channels != total:
            raise ValueError(f'LinearBNHead classifies the input features directly, so channels must equal the '
                             f'input channels ({total}); got channels={channels}')
        kwargs.setdefault('norm_cfg', dict(type='SyncBN', requires_grad=True))
        super().__init__(in_channels=in_channels, channels=channels, **kwargs)
        # Named ``norm`` as in the published head (mmseg 0.x FCNHead with_norm), so ``decode_head.norm.*`` loads.
        self.norm = build_norm_layer(self.norm_cfg, self.in_channels)[1]

    def forward(self, inputs):
        return self.cls_seg(self.norm(self._transform_inputs(inputs)))
