"""Deferred loading: InternViT built on the meta device; each rank later writes only the part it holds.

A sharded start-up (FSDP, DeepSpeed ZeRO-3) allocates each tensor without touching its memory, shards it, and
writes only this rank's shard, so no rank ever holds the whole model or the whole checkpoint::

    with deferred_loading():
        model = InternViT('internvit_6b_224', pretrained='intern_vit_6b_224px.safetensors')  # meta, checked
    ...
    allocate(module, 'cpu')                      # FSDP's param_init_fn: memory reserved, not written
    flat[a:b].copy_(range_reader(param)(i, j))   # this rank's elements of the flattened parameter

Inside ``deferred_loading()`` an InternViT given ``pretrained=`` checks the checkpoint's names and shapes against the
model (strictly, as an eager load would) without reading any tensor; ``range_reader`` then reads only the asked
elements (safetensors: a view of the memory-mapped file, so only those pages are read; ``.pth``: a memory-mapped
load, the tensor copied out). Without ``pretrained`` the random initialisation an eager build would do is drawn at
once, in the same order (the random stream goes on as after an eager build, so the heads built next get the same
values), and replayed per parameter when asked (``RandomInitReplay``). A ``load_state_dict`` into the deferred
backbone (a runner's ``load_from``) replaces the values it gives (``LoadedTensors``). Either way the values are those
an eager build and load give, cast to the parameter's dtype. ``materialize`` fills a module's tensors whole (tests,
small modules).
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import weakref
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .layouts import POS_KEY, WeightsError, _plan, _split_names, to_canonical
from .loading import check_state_dict
from .pos_embed import resample_pos_embed
from .reading import _safetensors_keys, _unwrap, read_tensors, safe_torch_load, weight_files

_DEPTH = [0]  # nesting depth of deferred_loading()
# Every module of a deferred backbone -> (where its values come from: a CheckpointReader or a RandomInitReplay,
# its name inside the backbone).
_OWNERS: 'weakref.WeakKeyDictionary[nn.Module, tuple[object, str]]' = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def deferred_loading() -> Iterator[None]:
    """InternViTs built in this context stay on the meta device; see the module docstring."""
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

    def read_range(self, name: str, shape: tuple, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor ``name`` as the model of ``shape`` takes it. From a
        safetensors file only the pages of that range are read (a view of the memory-mapped file)."""
        return _flat_range(name, self.read([name])[name], shape, start, stop)


def _flat_range(name: str, value: torch.Tensor, shape: tuple, start: int, stop: int) -> torch.Tensor:
    if name == POS_KEY and tuple(value.shape) != shape:
        side = round((shape[1] - 1) ** 0.5)
        value = resample_pos_embed(value.float(), (side, side))
    return value.reshape(-1)[start:stop]


class LoadedTensors:
    """Tensors loaded into a deferred backbone with ``load_state_dict`` (e.g. a runner's ``load_from``): they are its
    values now; a tensor the load did not give still comes from ``fallback`` (the previous source)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], fallback):
        self.tensors, self.fallback = dict(tensors), fallback

    def read_range(self, name: str, shape: tuple, start: int, stop: int) -> torch.Tensor:
        if name not in self.tensors:
            return self.fallback.read_range(name, shape, start, stop)
        return _flat_range(name, self.tensors[name], shape, start, stop)


class RandomInitReplay:
    """The random initialisation a backbone built eagerly would get, drawn once in the same order (so the random
    stream goes on exactly as after an eager build) and replayed later one parameter at a time.

    The eager build draws in each module's constructor (registration order, i.e. ``named_modules()`` order), then in
    the backbone's init steps. Here every module with parameters runs its ``reset_parameters`` (what its constructor
    does) on a private CPU copy, and every init step on a temporary tensor; before each, the generator's state is
    kept. A parameter's value is then the last of these to write it, run again from its kept state. Memory: one
    parameter at a time. Only the CPU generator is used, as an eager build on the CPU does.
    """

    def __init__(self, model: nn.Module, init_steps: Iterable[tuple[str, Callable]]):
        self._last: dict[str, tuple[torch.Tensor, Callable[[], torch.Tensor]]] = {}
        for prefix, module in model.named_modules():
            own = dict(module.named_parameters(recurse=False))
            if module._buffers:
                raise TypeError(f'{type(module).__name__} ({prefix}) has buffers: deferred random initialisation '
                                f'handles parameters only')
            if not own:
                continue
            if not hasattr(module, 'reset_parameters'):
                raise TypeError(f'{type(module).__name__} ({prefix}) has parameters but no reset_parameters(): its '
                                f'random initialisation cannot be replayed')
            specs = {name: (p.shape, p.dtype) for name, p in own.items()}
            for name in own:
                self._record(f'{prefix}.{name}' if prefix else name, partial(_reset_copy, module, specs, name))
            _reset_copy(module, specs, None)  # the constructor's draws
        shapes = {name: (p.shape, p.dtype) for name, p in model.named_parameters()}
        for name, step in init_steps:
            shape, dtype = shapes[name]
            self._record(name, partial(_run_step, step, shape, dtype))
            _run_step(step, shape, dtype)
        _release_free_heap()

    def _record(self, name: str, produce: Callable[[], torch.Tensor]) -> None:
        _release_free_heap()  # what the previous step left
        self._last[name] = (torch.get_rng_state(), produce)

    def value(self, name: str) -> torch.Tensor:
        state, produce = self._last[name]
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state)
            value = produce()
        _release_free_heap()
        return value

    def read_range(self, name: str, shape: tuple, start: int, stop: int) -> torch.Tensor:
        return self.value(name).reshape(-1)[start:stop]


def _release_free_heap() -> None:
    """Give freed heap memory back to the system (glibc; elsewhere nothing). ``trunc_normal_`` leaves freed
    temporaries in the heap, where the large allocations that follow (mmapped shards) cannot reuse them; a per-rank
    memory bound must not grow with them."""
    if _LIBC[0] is None:
        try:
            _LIBC[0] = ctypes.CDLL('libc.so.6').malloc_trim
        except (OSError, AttributeError):
            _LIBC[0] = lambda pad: 0
    _LIBC[0](0)


_LIBC: list = [None]


@torch.no_grad()
def _reset_copy(module: nn.Module, specs: Mapping[str, tuple], name: str | None) -> torch.Tensor | None:
    """Run ``module.reset_parameters()`` on a copy with its own parameters on the CPU; return parameter ``name``."""
    twin = copy.copy(module)  # shares children; own parameters replaced below
    twin._parameters = {k: None for k in module._parameters}  # e.g. a Linear's bias=None stays
    twin._parameters.update({k: nn.Parameter(torch.empty(shape, dtype=dtype, device='cpu'))
                             for k, (shape, dtype) in specs.items()})
    twin.reset_parameters()
    return None if name is None else twin._parameters[name].data


@torch.no_grad()
def _run_step(step: Callable, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype, device='cpu')
    step(tensor)
    return tensor


def defer(backbone: nn.Module, path: str | None, init_steps: Iterable[tuple[str, Callable]] = ()) -> None:
    """Remember where each tensor of the meta-device ``backbone`` will get its value: the checkpoint ``path`` (checked
    against the model at once, names and shapes only), or, without a path, the random initialisation the backbone
    would have had (``RandomInitReplay``: its modules' ``reset_parameters`` and then ``init_steps``, drawn now)."""
    if path is not None:
        source = CheckpointReader(path)
        check_state_dict(backbone, source.meta_state_dict(), source=str(path), strict=True)  # names and shapes
    else:
        source = RandomInitReplay(backbone, init_steps)
    _set_source(backbone, source)
    backbone.register_load_state_dict_pre_hook(_take_loaded_tensors)


def _set_source(backbone: nn.Module, source) -> None:
    for name, module in backbone.named_modules():
        _OWNERS[module] = (source, name)


def _take_loaded_tensors(backbone: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str, *args) -> None:
    """``load_state_dict`` into a backbone still on the meta device (names and shapes are checked by it, the copy
    itself does nothing there): the loaded tensors become the values its ranks will write."""
    if not any(p.is_meta for p in backbone.parameters()):
        return
    tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if tensors:
        _set_source(backbone, LoadedTensors(tensors, _OWNERS[backbone][0]))


def _own_tensors(module: nn.Module) -> Mapping[str, torch.Tensor]:
    return {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}


def allocate(module: nn.Module, device: torch.device | str) -> None:
    """Allocate ``module``'s own meta tensors (not its children's) on ``device`` without values, each remembering where
    its value comes from (``pending_value``). The memory is not touched, so it costs nothing until written: a sharded
    start-up writes only this rank's shard (``range_reader``). Usable as FSDP's ``param_init_fn``; a module without
    meta tensors is left alone, a meta tensor of a module that is not part of a deferred backbone is an error.
    (Untouched means no host memory on the CPU; on a GPU the allocation counts, one unit at a time.)"""
    meta = [name for name, t in _own_tensors(module).items() if t.is_meta]
    if not meta:
        return
    owner = _OWNERS.get(module)
    if owner is None:
        raise RuntimeError(f'{type(module).__name__} has tensors on the meta device ({", ".join(meta)}) but is not '
                           f'part of an InternViT built under deferred_loading(): nothing can fill them')
    source, prefix = owner
    module.to_empty(device=device, recurse=False)
    tensors = _own_tensors(module)
    for local in meta:
        tensors[local]._deferred_value = (source, f'{prefix}.{local}' if prefix else local)


def pending_value(tensor: torch.Tensor) -> tuple[object, str] | None:
    """(source, name) of a tensor that ``allocate`` left without its value, else None."""
    return getattr(tensor, '_deferred_value', None)


def range_reader(tensor: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """For a pending ``tensor`` (in its shape now): ``read(start, stop)`` gives elements ``[start, stop)`` of its
    flattened value in the source's dtype (from a safetensors checkpoint only the pages they need), to ``copy_``."""
    source, name = pending_value(tensor)
    return partial(source.read_range, name, tuple(tensor.shape))


@torch.no_grad()
def fill(tensor: torch.Tensor) -> None:
    """Write the whole value of a pending ``tensor`` into it; it is pending no more."""
    tensor.view(-1).copy_(range_reader(tensor)(0, tensor.numel()))
    written(tensor)


def written(tensor: torch.Tensor) -> None:
    """``tensor``'s value has been written (whole, or this rank's part of it): it is pending no more."""
    del tensor._deferred_value


def materialize(module: nn.Module, device: torch.device | str) -> None:
    """``allocate`` and ``fill`` ``module``'s own meta tensors: the values an eager start-up gives them."""
    allocate(module, device)
    for tensor in _own_tensors(module).values():
        if pending_value(tensor) is not None:
            fill(tensor)
