"""Feature pyramid from a plain ViT: four scales from one grid (the published UperNet setting)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from torch import nn

from mm_adapter.strict_loading import init_cfg_loads_pretrained

from ._registry import register_everywhere


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map, computed in float32 (the published pyramid's norm, eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = F.layer_norm(x.float().permute(0, 2, 3, 1), (x.shape[1],), self.weight.float(), self.bias.float(),
                           self.eps)
        return x32.permute(0, 3, 1, 2).to(x.dtype)


def _build_norm(norm_cfg: dict, channels: int) -> nn.Module:
    if norm_cfg.get('type') == 'LN2d':
        return LayerNorm2d(channels, eps=norm_cfg.get('eps', 1e-6))
    return build_norm_layer(norm_cfg, channels)[1]


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
        norm_cfg: norm between the transposed convolutions: ``dict(type='LN2d', eps=1e-6)`` (the default, as
            published: LayerNorm over channels) or any mmcv norm (``dict(type='SyncBN')``, ``dict(type='BN')``).

    Initialisation as published: transposed convolutions ``normal(0, sqrt(2 / fan_out))`` with
    ``fan_out = k * k * out_channels``, zero bias; norms weight 1, bias 0.
    """

    def __init__(self, in_channels: int, scales: Sequence[float] = (4, 2, 1, 0.5),
                 norm_cfg: dict | None = None, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        norm_cfg = dict(type='LN2d', eps=1e-6) if norm_cfg is None else norm_cfg
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
                layers += [_build_norm(norm_cfg, channels), nn.GELU()]
            layers.append(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
        return nn.Sequential(*layers)

    def init_weights(self):
        super().init_weights()
        if init_cfg_loads_pretrained(self.init_cfg):
            return  # loaded by super(): a fresh initialisation must not overwrite it
        for module in self.modules():
            if isinstance(module, nn.ConvTranspose2d):
                # nn.ConvTranspose2d weights are [in, out/groups, kh, kw]; fan_out counts the outputs per group.
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.branches):
            raise ValueError(f'ViTFeaturePyramid has {len(self.branches)} scales {self.scales} and needs one input '
                             f'per scale, got {len(inputs)} (set the backbone out_indices to {len(self.branches)} '
                             f'layers)')
        return tuple(branch(x) for branch, x in zip(self.branches, inputs))
