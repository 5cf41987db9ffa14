"""Strict loading of a state dict (any layout) into an InternViT: everything is checked before anything is copied."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .dtypes import as_dtype
from .layouts import _LAYER_RE, POS_KEY, WeightsError, _few, _layer_indices, _natural_key, as_canonical
from .pos_embed import resample_pos_embed
from .reading import is_file_view, release_pages

logger = logging.getLogger(__name__)

__all__ = ['load_into_model', 'build_and_load', 'StateDictMismatch', 'compare_state_dicts', 'describe_mismatch']


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
    logger.info(f'{source}: position embedding resampled from a {old}x{old} to a {grid}x{grid} grid (bicubic)')
    sd[POS_KEY] = resampled.to(dtype or pos.dtype)


def _shape(value: Any) -> tuple | None:
    if isinstance(value, torch.Size):
        return tuple(value)
    shape = getattr(value, 'shape', None)
    return None if shape is None else tuple(shape)


@dataclass(frozen=True)
class StateDictMismatch:
    """How a state dict differs from the one a model expects (see ``compare_state_dicts``)."""

    missing: list[str] = field(default_factory=list)       # the model's names the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)    # the checkpoint's names the model lacks
    misshaped: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)  # name -> (checkpoint's, model's)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def describe(self, shown: int = 5, rename: Callable[[str], str] | None = None, found_as: str = 'checkpoint',
                 expected_as: str = 'model') -> list[str]:
        """One phrase per kind of problem, naming ``shown`` tensors (in the file's names, via ``rename``) and
        counting the rest; ``found_as`` / ``expected_as`` name the two sides."""
        rename = rename or (lambda name: name)
        lines = []
        if self.missing:
            lines.append(f'{len(self.missing)} tensors of the {expected_as} are missing from the {found_as}: '
                         f'{_few(map(rename, self.missing), shown)}')
        if self.unexpected:
            lines.append(f'{len(self.unexpected)} tensors of the {found_as} are not in the {expected_as}: '
                         f'{_few(map(rename, self.unexpected), shown)}')
        if self.misshaped:
            names = sorted(self.misshaped, key=_natural_key)
            listed = '; '.join(f'{rename(k)}: {found_as} {self.misshaped[k][0]} vs {expected_as} {self.misshaped[k][1]}'
                               for k in names[:shown])
            more = f' and {len(names) - shown} more' if len(names) > shown else ''
            lines.append(f'{len(names)} tensors have another shape: {listed}{more}')
        return lines


def compare_state_dicts(found: Mapping[str, Any], expected: Mapping[str, Any]) -> StateDictMismatch:
    """Names and shapes of ``found`` (a checkpoint's state dict) against ``expected`` (a model's state dict, or
    names -> ``torch.Size``); dtypes do not matter. Entries without a shape, and a module's ``_extra_state``
    (serialised metadata of any length), are compared by name only."""
    misshaped = {}
    for name, value in found.items():
        if name not in expected or name.endswith('_extra_state'):
            continue
        have, want = _shape(value), _shape(expected[name])
        if have is not None and want is not None and have != want:
            misshaped[name] = (have, want)
    return StateDictMismatch(missing=[k for k in expected if k not in found],
                             unexpected=[k for k in found if k not in expected], misshaped=misshaped)


def describe_mismatch(found: Mapping[str, Any], expected: Mapping[str, Any], **describe_options) -> list[str]:
    """The phrases of ``compare_state_dicts(found, expected).describe(...)``: empty when everything fits."""
    return compare_state_dicts(found, expected).describe(**describe_options)


def _check(sd: dict[str, torch.Tensor], expected: Mapping[str, torch.Size], depth: int, source: str,
           strict: bool) -> dict[str, torch.Tensor]:
    """Drop/refuse extra layers, then refuse shape mismatches, missing and unexpected keys (strict)."""
    layers = _layer_indices(sd)
    if layers and layers[-1] >= depth:
        extra = [k for k in sd if (m := _LAYER_RE.match(k)) and int(m.group(1)) >= depth]
        if strict:
            raise WeightsError(f'{source}: the checkpoint has {layers[-1] + 1} layers but the model has {depth}; '
                               f'pass strict=False to load the first {depth} and drop layers {depth}-{layers[-1]}')
        logger.info(f'{source}: dropped layers {depth}-{layers[-1]} of the checkpoint ({len(extra)} tensors); '
                  f'the model has {depth} layers')
        sd = {k: v for k, v in sd.items() if k not in set(extra)}
    loadable = [k for k in sd if k in expected]
    if not loadable:
        raise WeightsError(f'{source} loads nothing into the model: none of its {len(sd)} tensors is an InternViT '
                           f'parameter (e.g. {_few(sd, 3)})')
    mismatch = compare_state_dicts(sd, expected)
    if mismatch.misshaped or (strict and mismatch):  # another shape is an error even with strict=False
        raise WeightsError(f'{source}: ' + '; '.join(mismatch.describe()))
    if mismatch:
        logger.warning(f'{source} (strict=False): ' + '; '.join(mismatch.describe()))
    return {k: sd[k] for k in loadable}


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str,
                     strict: bool = True) -> dict[str, torch.Tensor]:
    """The canonical tensors of ``state_dict`` that ``load_into_model`` would load into ``model`` (position
    embedding resampled to the model's grid), after checking names and shapes; copies nothing, so a state dict of
    meta tensors checks a checkpoint without reading it."""
    sd = {k: v for k, v in as_canonical(state_dict).items() if isinstance(v, torch.Tensor)}
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    pos_param = params.get(POS_KEY)
    _resample_to_grid(sd, model.arch.grid_size, source, pos_param.dtype if pos_param is not None else None)
    return _check(sd, {k: v.shape for k, v in params.items()}, model.depth, source, strict)


def load_into_model(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str, strict: bool = True,
                    dtype: torch.dtype | str | None = None, device: torch.device | str | None = None) -> None:
    """Load a (canonical, or any-layout) state dict into an ``InternViT``, resampling the position embedding.

    Everything is checked before anything is copied. ``strict=False`` drops layers beyond the model's depth and
    tolerates missing/unexpected tensors (logged); shape mismatches are always errors.

    Parameters on the meta device (a model built by ``build_and_load``) get their tensor here, placed once in
    ``dtype`` (default: the parameter's own) on ``device`` (default: the CPU): a memory-mapped safetensors tensor
    that already has that dtype, on the CPU, becomes the parameter itself (a private copy-on-write view, as
    ``safetensors.torch.load_file`` gives), any other is converted in one copy. Parameters that already exist
    are copied into. Pages of memory-mapped checkpoint tensors are released as soon as they are copied.
    """
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    sd = check_state_dict(model, state_dict, source=source, strict=strict)
    dtype, device = as_dtype(dtype), torch.device(device if device is not None else 'cpu')
    with torch.no_grad():
        for name, tensor in sd.items():
            target = params[name]
            if not target.is_meta:
                target.copy_(tensor)
                release_pages(tensor)
            elif is_file_view(tensor) and tensor.dtype == (dtype or target.dtype) and device.type == 'cpu':
                _place(model, name, tensor)  # already in place: a private copy-on-write view of the file
            else:
                _place(model, name, tensor.to(device=device, dtype=dtype or target.dtype, copy=True))
                release_pages(tensor)
    unloaded = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if unloaded:
        raise WeightsError(f'{source}: {len(unloaded)} tensors of a model built without initialisation are not in '
                           f'the checkpoint: {_few(unloaded)}')


def _place(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` where the meta tensor ``name`` is (a parameter keeps its ``requires_grad``)."""
    owner_name, _, attr = name.rpartition('.')
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=owner._parameters[attr].requires_grad)
    else:
        owner._buffers[attr] = value


def build_and_load(build: Callable[[], nn.Module], state_dict: Mapping[str, torch.Tensor], *, source: str,
                   dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                   strict: bool = True) -> nn.Module:
    """Build a model on the meta device (no random initialisation) and load a checkpoint strictly into it.

    ``build`` constructs the model (e.g. ``lambda: InternViT(arch)``); every tensor is then allocated once, in
    ``dtype`` on ``device``, from the checkpoint (see ``load_into_model``). The one way the project turns weights
    into a model: ``InternViT(pretrained=...)``, ``InternViT.from_pretrained``, chat and the export tool use it.
    """
    with torch.device('meta'):
        model = build()
    load_into_model(model, state_dict, source=source, strict=strict, dtype=dtype, device=device)
    return model
