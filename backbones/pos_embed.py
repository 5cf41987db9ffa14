"""Resampling of absolute position embeddings to another patch grid (timm's ``resample_abs_pos_embed``)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from timm.layers import resample_abs_pos_embed

__all__ = ['resample_pos_embed']


def resample_pos_embed(pos_embed: torch.Tensor, grid_hw: Sequence[int]) -> torch.Tensor:
    """Resize ``[1, 1+S*S, C]`` position embeddings to a ``(h, w)`` grid; the cls entry is kept as it is.

    Bicubic, align_corners=False, no antialiasing, computed in float32 and returned in the input's dtype (what the
    published model does at every forward), by timm's ``resample_abs_pos_embed``. The same grid returns the input
    unchanged; a stored grid that is not square is an error.
    """
    h, w = int(grid_hw[0]), int(grid_hw[1])
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f'position embedding has {n} patch entries, which is not a square grid')
    if (side, side) == (h, w):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, [h, w], old_size=[side, side], num_prefix_tokens=1,
                                  interpolation='bicubic', antialias=False)
