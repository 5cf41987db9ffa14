"""Deferred loading: InternViT built on the meta device, each part filled from its checkpoint when it is allocated.

A sharded start-up (FSDP, DeepSpeed ZeRO-3) allocates one shard unit (a block) at a time, fills it and shards it
before the next, so no rank ever holds the whole model or the whole checkpoint::

    with deferred_loading():
        model = InternViT('internvit_6b_224', pretrained='intern_vit_6b_224px.safetensors')  # meta, checked
    ...
    materialize(model.encoder.layers[0], torch.device('cpu'))  # FSDP's param_init_fn does this per module

Inside ``deferred_loading()`` an InternViT given ``pretrained=`` checks the checkpoint's names and shapes against the
model (strictly, as an eager load would) without reading any tensor. ``materialize`` reads only the tensors of the
module it is given (safetensors: opened and closed per call, so the file's pages do not stay mapped; ``.pth``: a
memory-mapped load per call) and copies them in, cast to the parameter's dtype -- the same values an eager load
gives. Without ``pretrained`` nothing is deferred (a random initialisation must consume the random stream in the
same order on every rank as it does today).
"""
from __future__ import annotations

import contextlib
import weakref
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from .layouts import POS_KEY, WeightsError, _plan, _split_names, to_canonical
from .loading import check_state_dict
from .pos_embed import resample_pos_embed
from .reading import _safetensors_keys, _unwrap, read_tensors, safe_torch_load, weight_files

_DEPTH = [0]  # nesting depth of deferred_loading()
# Every module of a deferred backbone -> (its checkpoint reader, its name inside the backbone).
_OWNERS: 'weakref.WeakKeyDictionary[nn.Module, tuple[CheckpointReader, str]]' = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def deferred_loading() -> Iterator[None]:
    """InternViTs built with ``pretrained=`` in this context stay on the meta device; see the module docstring."""
    _DEPTH[0] += 1
    try:
        yield
    finally:
        _DEPTH[0] -= 1


def loading_is_deferred() -> bool:
    return _DEPTH[0] > 0


class CheckpointReader:
    """The canonical tensors of a checkpoint (file or HF/chat directory, any layout), read a few at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise FileNotFoundError(f'checkpoint {path} does not exist')
        if self.path.is_dir():
            self._files = weight_files(self.path)
        elif self.path.suffix == '.safetensors':
            self._files = dict.fromkeys(_safetensors_keys(self.path), self.path)
        else:
            self._files = dict.fromkeys(self._pth_tensors(), self.path)
        self.prefix, self.layout, selected, _ = _plan(self._files)
        self._selected = selected

    def _pth_tensors(self) -> dict[str, torch.Tensor]:
        return _unwrap(safe_torch_load(self.path), self.path)[0]  # memory-mapped: nothing is read yet

    def _source_tensors(self, keys: list[str]) -> dict[str, torch.Tensor]:
        if self.path.is_dir() or self.path.suffix == '.safetensors':
            return read_tensors(self._files, keys)
        everything = self._pth_tensors()
        return {k: everything[k].clone() for k in keys}  # copied out, so the mapping goes with `everything`

    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        """Canonical names -> meta tensors of the stored shapes (for checking a model without reading data)."""
        shapes = self._shapes()
        canonical, _ = to_canonical({k: torch.empty(shapes[k], device='meta') for k in self._selected})
        return canonical

    def _shapes(self) -> dict[str, tuple]:
        if self.path.is_dir() or self.path.suffix == '.safetensors':
            from safetensors import safe_open
            shapes = {}
            by_file: dict[Path, list[str]] = {}
            for key in self._selected:
                by_file.setdefault(self._files[key], []).append(key)
            for file, keys in by_file.items():
                if file.suffix != '.safetensors':
                    shapes.update({k: tuple(v.shape) for k, v in _unwrap(safe_torch_load(file), file)[0].items()
                                   if k in keys})
                    continue
                with safe_open(str(file), framework='pt') as f:
                    shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in keys})
            return shapes
        return {k: tuple(v.shape) for k, v in self._pth_tensors().items()}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Canonical tensors by name (tensors split in the checkpoint's layout are joined)."""
        parts = {name: _split_names(name, self.layout, self.prefix) for name in names}
        missing = [p for ps in parts.values() for p in ps if p not in self._files]
        if missing:
            raise WeightsError(f'{self.path}: missing {len(missing)} tensors: {", ".join(missing[:5])}')
        source = self._source_tensors([p for ps in parts.values() for p in ps])
        return {name: source[ps[0]] if len(ps) == 1 else torch.cat([source[p] for p in ps])
                for name, ps in parts.items()}


def defer(backbone: nn.Module, path: str) -> None:
    """Check ``path`` against the meta-device ``backbone`` and remember where each of its modules loads from."""
    reader = CheckpointReader(path)
    check_state_dict(backbone, reader.meta_state_dict(), source=str(path), strict=True)  # names and shapes only
    for name, module in backbone.named_modules():
        _OWNERS[module] = (reader, name)


def _own_tensors(module: nn.Module) -> Mapping[str, torch.Tensor]:
    return {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}


@torch.no_grad()
def materialize(module: nn.Module, device: torch.device | str) -> None:
    """Allocate ``module``'s own meta tensors (not its children's) on ``device`` and fill them from the checkpoint.

    Usable as FSDP's ``param_init_fn`` (called for every module of a unit); a module without meta tensors is left
    alone. A meta tensor of a module that is not part of a deferred backbone is an error.
    """
    meta = [name for name, t in _own_tensors(module).items() if t.is_meta]
    if not meta:
        return
    owner = _OWNERS.get(module)
    if owner is None:
        raise RuntimeError(f'{type(module).__name__} has tensors on the meta device ({", ".join(meta)}) but is not '
                           f'part of an InternViT built under deferred_loading() with pretrained=: nothing can '
                           f'fill them')
    reader, prefix = owner
    full = {f'{prefix}.{n}' if prefix else n: n for n in meta}
    values = reader.read(list(full))
    module.to_empty(device=device, recurse=False)
    tensors = _own_tensors(module)
    for name, local in full.items():
        value, target = values[name], tensors[local]
        if name == POS_KEY and value.shape != target.shape:
            side = round((target.shape[1] - 1) ** 0.5)
            value = resample_pos_embed(value.float(), (side, side))
        target.copy_(value)
