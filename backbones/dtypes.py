"""The one parser of dtype names used across the project."""
from __future__ import annotations

import torch

__all__ = ['as_dtype']


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name ('bfloat16', 'bf16', 'torch.float32', ...); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace('torch.', '')
    aliases = {'bf16': 'bfloat16', 'fp16': 'float16', 'half': 'float16', 'fp32': 'float32', 'float': 'float32'}
    resolved = getattr(torch, aliases.get(name, name), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f'unknown dtype {dtype!r}; use bfloat16, float16 or float32')
    return resolved
