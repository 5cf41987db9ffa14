"""Reading InternViT weights safely from files and directories (any layout, canonical names out).

What ``read_weights`` reads:
  * HF ``InternVisionModel`` directories (single or sharded safetensors, ``pytorch_model.bin`` with or without an
    index), InternVL-Chat directories (``vision_model.*``; only the shards holding vision tensors are read), and
    single files with or without a ``vision_model.`` prefix;
  * the original segmentation/classification ``.pth`` (``cls_token``, ``blocks.{i}.*``), plain or wrapped as
    ``{'module'|'model'|'state_dict': sd}``; other heads (``clip_projector.*``) are ignored with a log line;
  * transformers' native ``InternVLVisionModel`` (``*-hf`` repos, ``vision_tower.`` / ``model.vision_tower.``);
  * MMEngine checkpoints of any of these (``state_dict`` with ``backbone.`` prefix; heads ignored with a log line).

Trust boundary: every ``torch.load`` here uses ``weights_only=True``. MMEngine training checkpoints also pickle
their message hub (``HistoryBuffer``, numpy scalars, ``builtins.getattr``); those few non-tensor globals are
replaced by an inert stand-in that is never called into, so the state dict can still be read while nothing from
the file is executed. Any other global is refused.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import mmap
import os
import pickle
import weakref
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .arch_config import vision_config_of
from .layouts import Weights, WeightsError, _describe_groups, _plan, to_canonical

logger = logging.getLogger(__name__)

__all__ = ['read_weights', 'safe_torch_load', 'weight_files', 'read_tensors', 'release_pages']


class _Opaque:
    """Inert stand-in for the non-tensor objects of an MMEngine checkpoint (message hub, numpy scalars).

    It accepts any arguments and state and does nothing with them; nothing of the original class is run.
    """

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return '<not unpickled>'


# Globals that MMEngine/OpenMMLab training checkpoints pickle beside their tensors (message hub, numpy scalars);
# each is replaced by the inert stand-in. Everything else weights_only refuses stays refused.
_STAND_IN_PACKAGES = ('mmengine', 'mmseg', 'mmcv', 'mmpretrain', 'mmdet', 'numpy')


_STAND_IN_NAMES = ('builtins.getattr',)


def _can_stand_in(name: str) -> bool:
    return name in _STAND_IN_NAMES or name.split('.', 1)[0] in _STAND_IN_PACKAGES


# What torch's weights-only unpickler says when it refuses an object (rather than failing to parse the file).
_REFUSALS = ('Unsupported global', 'is blocked', 'Trying to call reduce', 'Can only build', 'Can only create new',
             'Unsupported class')


def _reason(err: Exception, signs: Iterable[str] = ()) -> str:
    """The informative line of torch's long unpickling message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for sign in tuple(signs) + ('Unsupported operand', 'WeightsUnpickler error'):
        for line in lines:
            if sign in line:
                return line.split(' Please use ')[0].replace('WeightsUnpickler error: ', '')
    return lines[0] if lines else type(err).__name__


def safe_torch_load(path: str | os.PathLike, stand_ins: Iterable[str] = ()) -> Any:
    """``torch.load(weights_only=True)`` on CPU, with errors that name the file.

    MMEngine training checkpoints also pickle their message hub and numpy scalars; those objects are replaced by
    inert stand-ins (nothing of theirs runs), so the tensors and plain metadata of any run's checkpoint can be
    read safely. Any other non-tensor global stays refused (``WeightsError``), unless ``stand_ins`` names it
    (``module.QualName``, for files whose tensors are wanted beside foreign objects, e.g. the published probe
    head's yacs config): then it gets a stand-in too, and a dict subclass becomes a plain ``OrderedDict`` of its
    (equally inert) contents.
    """
    path = Path(path)
    is_zip = zipfile.is_zipfile(path)
    kwargs = dict(map_location='cpu', weights_only=True, mmap=is_zip)
    try:
        try:
            return torch.load(path, **kwargs)
        except pickle.UnpicklingError as err:
            if 'Unsupported global' not in str(err) or not is_zip:
                raise
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            refused = [n for n in names if not _can_stand_in(n)]
            if any(n not in stand_ins for n in refused):
                raise
            try:
                with torch.serialization.safe_globals([(_Opaque, n) for n in names]):
                    obj = torch.load(path, **kwargs)
            except pickle.UnpicklingError as err:  # a foreign dict subclass: its items need a real dict
                if not refused or 'SETITEM' not in str(err):
                    raise
                with torch.serialization.safe_globals([(_Opaque, n) for n in names if n not in refused]
                                                      + [(collections.OrderedDict, n) for n in refused]):
                    obj = torch.load(path, **kwargs)
            logger.info(f'{path}: non-tensor objects ({", ".join(sorted(names))}) were not unpickled '
                        f'(replaced by inert stand-ins); tensors read with weights_only=True')
            return obj
    except pickle.UnpicklingError as err:
        if not any(sign in str(err) for sign in _REFUSALS):
            raise WeightsError(f'cannot read {path}: the file is corrupt, truncated or not a PyTorch checkpoint '
                               f'(UnpicklingError: {_reason(err)})') from None
        raise WeightsError(f'refused to load {path}: it pickles objects that weights_only=True does not allow, '
                           f'and checkpoints from elsewhere are never fully unpickled ({_reason(err, _REFUSALS)})'
                           ) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError) as err:
        raise WeightsError(f'cannot read {path}: the file is corrupt, truncated or not a PyTorch checkpoint '
                           f'({type(err).__name__}: {err})') from None


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    trail = []
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ('state_dict', 'model', 'module', 'model_state_dict'):
            if isinstance(obj.get(key), Mapping):
                obj, _ = obj[key], trail.append(key)
                break
        else:
            break
    if not isinstance(obj, Mapping):
        raise WeightsError(f'{path} loads nothing: it holds a {type(obj).__name__}, not a state dict')
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f'{path} loads nothing: no tensors found (top-level keys: '
                           f'{", ".join(map(str, list(obj)[:8]))})')
    return tensors, trail


def _safetensors_error(path: Path, err: Exception) -> WeightsError:
    return WeightsError(f'cannot read {path}: the file is corrupt, truncated or not safetensors ({err})')


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            return list(f.keys())
    except Exception as err:  # safetensors raises its own error types
        raise _safetensors_error(path, err) from None


def _safetensors_read(path: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors as views of a private memory map of the file: nothing is read until a tensor is used."""
    keys = list(keys)
    try:
        mapped = _map_safetensors(path)
    except _UnmappableDtype:
        mapped = None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _safetensors_error(path, err) from None
    if mapped is None:  # a dtype torch.frombuffer cannot view (e.g. float8): safetensors' own reader copies
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework='pt') as f:
                return {k: f.get_tensor(k) for k in keys}
        except Exception as err:
            raise _safetensors_error(path, err) from None
    missing = [k for k in keys if k not in mapped]
    if missing:
        raise _safetensors_error(path, KeyError(f'no tensor named {", ".join(missing[:3])}'))
    return {k: mapped[k] for k in keys}


class _UnmappableDtype(Exception):
    pass


class _FileMapping(mmap.mmap):
    """A private (copy-on-write) memory map of a weight file; a subclass so that it can be weakly referenced."""


# Base address -> (mapping, size) of every live mapping, so that release_pages recognises views of one.
_MAPPINGS: dict[int, tuple[weakref.ref, int]] = {}


def _map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (8-byte header length, JSON header, data) as a view of one mapping."""
    with open(path, 'rb') as f:
        size = os.fstat(f.fileno()).st_size
        header_len = int.from_bytes(f.read(8), 'little')
        if size < 8 or header_len > size - 8:
            raise ValueError(f'header length {header_len} does not fit a file of {size} bytes')
        header = json.loads(f.read(header_len))
        specs = {k: v for k, v in header.items() if k != '__metadata__'}
        if any(spec['dtype'] not in _SAFETENSORS_DTYPES for spec in specs.values()):
            raise _UnmappableDtype
        mapping = _FileMapping(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
    _MAPPINGS[base] = (weakref.ref(mapping), size)
    weakref.finalize(mapping, _MAPPINGS.pop, base, None)
    start = 8 + header_len
    tensors = {}
    for name, spec in specs.items():
        dtype, shape = _SAFETENSORS_DTYPES[spec['dtype']], [int(d) for d in spec['shape']]
        begin, end = (int(o) for o in spec['data_offsets'])
        numel = math.prod(shape)
        if end - begin != numel * dtype.itemsize or not 0 <= begin <= end <= size - start:
            raise ValueError(f'{name}: data offsets {begin}..{end} do not hold a {spec["dtype"]} tensor of shape '
                             f'{shape} in a file of {size} bytes')
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(mapping, dtype=dtype, count=numel, offset=start + begin).view(shape)
    return tensors


def _mapping_of(tensor: torch.Tensor):
    """(mapping, base address) of the mapped weight file a CPU tensor is a view of, or None."""
    if tensor.device.type != 'cpu':
        return None
    ptr = tensor.data_ptr()
    for base, (ref, size) in list(_MAPPINGS.items()):
        mapping = ref()
        if mapping is not None and base <= ptr < base + size:
            return mapping, base
    return None


def is_file_view(tensor: torch.Tensor) -> bool:
    """Whether the tensor is a view of a memory-mapped safetensors file read by this module."""
    return _mapping_of(tensor) is not None


def release_pages(tensor: torch.Tensor) -> None:
    """Let the OS drop this process's resident pages of a memory-mapped weight tensor after it has been copied.

    Peak memory of a load then stays near the model's own size: the file remains in the page cache, and a later
    use of the tensor reads it again. No-op for any tensor that is not a view of a mapped file; never call it on
    a view that was written to (copy-on-write changes would be discarded).
    """
    found = _mapping_of(tensor) if hasattr(mmap, 'MADV_DONTNEED') else None
    if found is None:
        return
    mapping, base = found
    offset, page = tensor.data_ptr() - base, mmap.PAGESIZE
    first = -(-offset // page) * page  # whole pages inside the tensor only
    last = min(offset + tensor.numel() * tensor.element_size(), len(mapping)) // page * page
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def _checkpoint_error(path: Path, err: WeightsError) -> WeightsError:
    return WeightsError(f'{path} loads nothing: {err}' if 'no InternViT tensor' in str(err) else f'{path}: {err}')


def _backbone_keys(keys: Iterable[str], path: Path, what: str = 'backbone') -> list[str]:
    """The keys that belong to the InternViT in a checkpoint; the rest is logged as ignored."""
    try:
        _, _, selected, ignored = _plan(keys)
    except WeightsError as err:
        raise _checkpoint_error(path, err) from None
    if ignored:
        logger.info(f'{path}: ignored {len(ignored)} tensors outside the {what}: {_describe_groups(ignored)}')
    return selected


def _read_file(path: Path) -> Weights:
    checkpoint = None
    if path.suffix == '.safetensors':
        tensors = _safetensors_read(path, _backbone_keys(_safetensors_keys(path), path))
    else:
        checkpoint = safe_torch_load(path)
        everything, trail = _unwrap(checkpoint, path)
        if trail:
            logger.info(f"{path}: reading {''.join(f'[{k!r}]' for k in trail)}")
        try:
            tensors = {k: everything[k] for k in _backbone_keys(everything, path)}
        except WeightsError as err:
            hint = _probe_checkpoint_hint(everything)
            raise (WeightsError(f'{err}. {hint}') if hint else err) from None
    sd, layout = to_canonical(tensors)
    return Weights(sd, _run_config_heads(checkpoint, path), layout, str(path))


def _run_config_heads(checkpoint: Any, path: Path) -> dict | None:
    """``{'num_attention_heads': N}`` from the run config an MMEngine checkpoint stores (``meta.cfg``), the one
    shape field its tensors cannot tell; None when there is none."""
    from .run_config import arch_from_backbone_config, backbone_config_from_text
    meta = checkpoint.get('meta') if isinstance(checkpoint, Mapping) else None
    text = meta.get('cfg') if isinstance(meta, Mapping) else None
    backbone = backbone_config_from_text(text) if isinstance(text, str) else None
    arch = arch_from_backbone_config(backbone) if backbone else None
    if arch is None:
        return None
    logger.info(f"{path}: {arch.num_heads} attention heads, from the run's config stored in the checkpoint "
                f"(meta.cfg: InternViT preset {backbone.get('preset')!r})")
    return {'num_attention_heads': arch.num_heads}


def _probe_checkpoint_hint(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Linear-probe checkpoints hold only heads; their record (JSON bytes) names the backbone they ran on."""
    record = state_dict.get('_extra_state')
    if not isinstance(record, torch.Tensor) or record.dtype != torch.uint8:
        return None
    try:
        backbone = json.loads(bytes(record.tolist()).decode())['backbone']
    except (ValueError, KeyError, TypeError):
        return None
    return (f"It is a linear-probe checkpoint, which holds only the heads; its frozen backbone is "
            f"{backbone.get('pretrained') or '(no path recorded)'} (sha256 {backbone.get('sha256', '?')}): export that")


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> file for an HF-style directory (sharded or not, safetensors preferred)."""
    for index_name in ('model.safetensors.index.json', 'pytorch_model.bin.index.json'):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())['weight_map']
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise WeightsError(f'cannot read {index}: not a valid index json ({err})') from None
            files = {}
            for key, name in weight_map.items():
                file = directory / name
                if not file.is_file():
                    raise WeightsError(f'{index} lists {name}, which is not in {directory}')
                files[key] = file
            return files
    for name in ('model.safetensors', 'pytorch_model.bin'):
        file = directory / name
        if file.is_file():
            if file.suffix == '.safetensors':
                return {k: file for k in _safetensors_keys(file)}
            return {k: file for k in _unwrap(safe_torch_load(file), file)[0]}
    if any(directory.glob('*model_states.pt')):
        raise WeightsError(f'{directory} is a DeepSpeed checkpoint folder: consolidate it first with the '
                           f'zero_to_fp32.py script DeepSpeed writes next to it (python zero_to_fp32.py '
                           f'{directory} OUT.bin), then read OUT.bin')
    raise WeightsError(f'{directory} has no weights: expected model.safetensors, model.safetensors.index.json, '
                       'pytorch_model.bin or pytorch_model.bin.index.json')


def read_tensors(files: Mapping[str, Path], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(files[key], []).append(key)
    out = {}
    for file, names in by_file.items():
        if file.suffix == '.safetensors':
            out.update(_safetensors_read(file, names))
        else:
            tensors = _unwrap(safe_torch_load(file), file)[0]
            out.update({k: tensors[k] for k in names})
    return out


def _read_config(directory: Path) -> dict | None:
    config_file = directory / 'config.json'
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f'cannot read {config_file}: {err}') from None


def _read_dir(directory: Path) -> Weights:
    config = _read_config(directory)
    files = weight_files(directory)
    selected = _backbone_keys(files, directory, 'vision backbone')
    shards = sorted({files[k].name for k in selected})
    if len(set(files.values())) > 1:
        logger.info(f'{directory}: reading {len(selected)} vision tensors from {len(shards)} of '
                  f'{len(set(files.values()))} weight files')
    sd, layout = to_canonical(read_tensors(files, selected))
    return Weights(sd, vision_config_of(config), layout, str(directory))


def read_weights(path: str | os.PathLike) -> Weights:
    """Read InternViT weights in any supported layout from a file, an HF/chat directory or a hub id (canonical
    names)."""
    from .hub import local_path
    p = local_path(path)  # a hub id ('OpenGVLab/InternViT-6B-224px') becomes its cached snapshot
    return _read_dir(p) if p.is_dir() else _read_file(p)


def _tensor_specs(files: Mapping[str, Path], keys: Iterable[str]) -> dict[str, tuple[tuple, torch.dtype]]:
    """(shape, dtype) of tensors without reading their data where the format allows it."""
    from safetensors import safe_open
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(files[key], []).append(key)
    specs = {}
    for file, names in by_file.items():
        if file.suffix == '.safetensors':
            try:
                with safe_open(str(file), framework='pt') as f:
                    for n in names:
                        sl = f.get_slice(n)
                        specs[n] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES[sl.get_dtype()])
            except Exception as err:
                raise _safetensors_error(file, err) from None
        else:
            tensors = _unwrap(safe_torch_load(file), file)[0]
            specs.update({n: (tuple(tensors[n].shape), tensors[n].dtype) for n in names})
    return specs


_SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
                       'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
                       'U8': torch.uint8, 'BOOL': torch.bool}
