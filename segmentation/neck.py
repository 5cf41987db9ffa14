"""Feature pyramid from a plain ViT: four scales from one grid (the published UperNet setting)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from torch import nn

from ._registry import register_everywhere


def _scale_exponent(scale: float) -> int:
    exponent = math.log2(scale)
    if scale <= 0 or exponent != round(exponent):
        raise ValueError(f'ViTFeaturePyramid scales must be powers of two (e.g. 4, 2, 1, 0.5), got {scale}')
    return int(round(exponent))


@register_everywhere('MODELS')
class ViTFeaturePyramid(BaseModule):
    """Turns same-size ViT feature maps (one per requested layer) into a pyramid, one scale per input.

    Per scale ``2**k``: ``k > 0`` upsamples with ``k`` stride-2 transposed convolutions with norm + GELU between
    them (x4: two, x2: one); ``k == 0`` is the identity; ``k < 0`` max-pools by ``2**-k`` (x1/2: 2x2 pooling).
    Channels are kept, so the head sees ``[in_channels] * len(scales)``.

    Args:
        in_channels: channels of every input map (the ViT width).
        scales: one scale per input, largest first (UperNet expects high to low resolution).
        norm_cfg: norm between the transposed convolutions (SyncBN, reverted to BN when not distributed).
    """

    def __init__(self, in_channels: int, scales: Sequence[float] = (4, 2, 1, 0.5),
                 norm_cfg: dict | None = None, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        norm_cfg = dict(type='SyncBN', requires_grad=True) if norm_cfg is None else norm_cfg
        self.in_channels = in_channels
        self.scales = tuple(scales)
        self.branches = nn.ModuleList(self._branch(_scale_exponent(s), in_channels, norm_cfg) for s in self.scales)

    @staticmethod
    def _branch(exponent: int, channels: int, norm_cfg: dict) -> nn.Module:
        if exponent == 0:
            return nn.Identity()
        if exponent < 0:
            return nn.MaxPool2d(kernel_size=2 ** -exponent, stride=2 ** -exponent)
        layers: list[nn.Module] = []
        for step in range(exponent):
            if step:
                layers += [build_norm_layer(norm_cfg, channels)[1], nn.GELU()]
            layers.append(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
        return nn.Sequential(*layers)

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.branches):
            raise ValueError(f'ViTFeaturePyramid has {len(self.branches)} scales {self.scales} and needs one input '
                             f'per scale, got {len(inputs)} (set the backbone out_indices to {len(self.branches)} '
                             f'layers)')
        return tuple(branch(x) for branch, x in zip(self.branches, inputs))
