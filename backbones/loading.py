"""Strict loading of a state dict (any layout) into an InternViT: everything is checked before anything is copied."""
from __future__ import annotations

import math
from typing import Mapping

import torch
from mmengine.logging import print_log

from .layouts import _LAYER_RE, POS_KEY, WeightsError, _detect_or_none, _few, _layer_indices, to_canonical
from .pos_embed import resample_pos_embed

__all__ = ['load_into_model']

def _resample_to_grid(sd: dict[str, torch.Tensor], grid: int, source: str, dtype: torch.dtype | None = None):
    pos = sd.get(POS_KEY)
    if pos is None or pos.ndim != 3:
        return
    if pos.shape[1] - 1 == grid * grid:
        return
    try:
        resampled = resample_pos_embed(pos.float(), (grid, grid))
    except ValueError as err:
        raise WeightsError(f'{source}: {POS_KEY}: {err}') from None
    old = math.isqrt(pos.shape[1] - 1)
    print_log(f'{source}: position embedding resampled from a {old}x{old} to a {grid}x{grid} grid (bicubic)',
              logger='current')
    sd[POS_KEY] = resampled.to(dtype or pos.dtype)


def _check(sd: dict[str, torch.Tensor], expected: Mapping[str, torch.Size], depth: int, source: str,
           strict: bool) -> dict[str, torch.Tensor]:
    """Drop/refuse extra layers, then refuse shape mismatches, missing and unexpected keys (strict)."""
    layers = _layer_indices(sd)
    if layers and layers[-1] >= depth:
        extra = [k for k in sd if (m := _LAYER_RE.match(k)) and int(m.group(1)) >= depth]
        if strict:
            raise WeightsError(f'{source}: the checkpoint has {layers[-1] + 1} layers but the model has {depth}; '
                               f'pass strict=False to load the first {depth} and drop layers {depth}-{layers[-1]}')
        print_log(f'{source}: dropped layers {depth}-{layers[-1]} of the checkpoint ({len(extra)} tensors); '
                  f'the model has {depth} layers', logger='current')
        sd = {k: v for k, v in sd.items() if k not in set(extra)}
    loadable = [k for k in sd if k in expected]
    if not loadable:
        raise WeightsError(f'{source} loads nothing into the model: none of its {len(sd)} tensors is an InternViT '
                           f'parameter (e.g. {_few(sd, 3)})')
    mismatched = [f'{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k])}'
                  for k in loadable if tuple(sd[k].shape) != tuple(expected[k])]
    if mismatched:
        raise WeightsError(f'{source}: shape mismatch in {len(mismatched)} tensors: ' + '; '.join(mismatched[:5])
                           + (f'; and {len(mismatched) - 5} more' if len(mismatched) > 5 else ''))
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    problems = []
    if missing:
        problems.append(f'missing {len(missing)} tensors: {_few(missing)}')
    if unexpected:
        problems.append(f'unexpected {len(unexpected)} tensors: {_few(unexpected)}')
    if problems:
        if strict:
            raise WeightsError(f'{source}: ' + '; '.join(problems))
        print_log(f'{source} (strict=False): ' + '; '.join(problems), logger='current', level=30)
    return {k: sd[k] for k in loadable}


def load_into_model(model, state_dict: Mapping[str, torch.Tensor], *, source: str, strict: bool = True) -> None:
    """Copy a (canonical, or any-layout) state dict into an ``InternViT``, resampling the position embedding.

    Everything is checked before anything is copied. ``strict=False`` drops layers beyond the model's depth and
    tolerates missing/unexpected tensors (logged); shape mismatches are always errors.
    """
    keys = list(state_dict)
    if _detect_or_none(keys) not in (None, ('', 'hf')):
        state_dict, _ = to_canonical(state_dict)
    sd = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    pos_param = params.get(POS_KEY)
    _resample_to_grid(sd, model.arch.grid_size, source, pos_param.dtype if pos_param is not None else None)
    sd = _check(sd, {k: v.shape for k, v in params.items()}, model.depth, source, strict)
    with torch.no_grad():
        for name, tensor in sd.items():
            params[name].copy_(tensor)
