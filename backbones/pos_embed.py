"""Resampling of absolute position embeddings to another patch grid."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ['resample_pos_embed']


def resample_pos_embed(pos_embed: torch.Tensor, grid_hw: Sequence[int]) -> torch.Tensor:
    """Resize ``[1, 1+S*S, C]`` position embeddings to a ``(h, w)`` grid; the cls entry is kept as it is.

    Bicubic, align_corners=False, computed in float32 (what the published model does at every forward).
    The same grid returns the input unchanged (bicubic at scale 1 is the identity).
    """
    h, w = int(grid_hw[0]), int(grid_hw[1])
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    n, c = patch_pos.shape[1], patch_pos.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f'position embedding has {n} patch entries, which is not a square grid')
    if (side, side) == (h, w):
        return pos_embed
    grid = patch_pos.float().reshape(1, side, side, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode='bicubic', align_corners=False)
    patch_pos = grid.reshape(1, c, h * w).permute(0, 2, 1).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)
