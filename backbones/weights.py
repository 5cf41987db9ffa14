"""InternViT weight layouts: read any of them, convert through the canonical state dict, write HF directories.

The canonical layout is the model's own state dict, which uses the Hugging Face ``InternVisionModel`` names
(``embeddings.*``, ``encoder.layers.{i}.*``). Every other layout is one table in ``LAYOUTS`` that maps canonical
names to that layout's names; a tuple of names means the canonical tensor is split along dim 0 (transformers'
native InternVL keeps q, k and v apart where InternViT has one ``qkv``). Prefixes (``backbone.``,
``vision_model.``, ``vision_tower.``, ``module.`` ...) are not part of a layout: they are found from the key names.

Layouts read (``read_weights``):
  * ``hf``: HF ``InternVisionModel`` directories (single or sharded safetensors, ``pytorch_model.bin`` with or
    without an index), InternVL-Chat directories (``vision_model.*``; only the shards holding vision tensors are
    read), and single files with or without a ``vision_model.`` prefix;
  * ``original``: the original segmentation/classification ``.pth`` (``cls_token``, ``blocks.{i}.*``), plain or
    wrapped as ``{'module'|'model'|'state_dict': sd}``; other heads (``clip_projector.*``) are ignored with a log
    line;
  * ``native``: transformers' ``InternVLVisionModel`` (``*-hf`` repos, ``vision_tower.`` / ``model.vision_tower.``);
  * MMEngine checkpoints of any of these (``state_dict`` with ``backbone.`` prefix; heads ignored with a log line).

Trust boundary: every ``torch.load`` here uses ``weights_only=True``. MMEngine training checkpoints also pickle
their message hub (``HistoryBuffer``, numpy scalars, ``builtins.getattr``); those few non-tensor globals are
replaced by an inert stand-in that is never called into, so the state dict can still be read while nothing from
the file is executed. Any other global is refused.
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from mmengine.logging import print_log

from .internvit import InternViTArch, resample_pos_embed

__all__ = ['Weights', 'WeightsError', 'LAYOUTS', 'read_weights', 'load_into_model', 'arch_for_weights',
           'hf_config_from_arch', 'native_config_from_arch', 'write_hf', 'write_hf_native', 'write_into_chat',
           'to_canonical', 'from_canonical', 'detect_layout']

POS_KEY = 'embeddings.position_embedding'
PATCH_KEY = 'embeddings.patch_embedding.weight'
_LAYER_RE = re.compile(r'^encoder\.layers\.(\d+)\.')


class WeightsError(ValueError):
    """A checkpoint that cannot be read, converted or loaded; the message names the file or tensor."""


# ------------------------------------------------------------------------------------------------- layouts
# Canonical names, with {i} a layer index and {wb} 'weight' or 'bias'.
CANONICAL_NAMES = (
    'embeddings.class_embedding',
    'embeddings.position_embedding',
    'embeddings.patch_embedding.{wb}',
    'encoder.layers.{i}.norm1.{wb}',
    'encoder.layers.{i}.attn.qkv.{wb}',
    'encoder.layers.{i}.attn.q_norm.weight',
    'encoder.layers.{i}.attn.k_norm.weight',
    'encoder.layers.{i}.attn.proj.{wb}',
    'encoder.layers.{i}.ls1',
    'encoder.layers.{i}.norm2.{wb}',
    'encoder.layers.{i}.mlp.fc1.{wb}',
    'encoder.layers.{i}.mlp.fc2.{wb}',
    'encoder.layers.{i}.ls2',
)


@dataclass(frozen=True)
class Layout:
    """One weight layout: canonical name template -> this layout's template (a tuple: split along dim 0)."""

    name: str
    description: str
    names: Mapping[str, str | tuple[str, ...]]
    namespaces: tuple[str, ...]  # top-level names that belong to the backbone in this layout


LAYOUTS: dict[str, Layout] = {
    'hf': Layout('hf', 'Hugging Face InternVisionModel', {n: n for n in CANONICAL_NAMES},
                 ('embeddings', 'encoder')),
    'original': Layout('original', 'original InternViT (segmentation/classification .pth)', {
        'embeddings.class_embedding': 'cls_token',
        'embeddings.position_embedding': 'pos_embed',
        'embeddings.patch_embedding.{wb}': 'patch_embed.proj.{wb}',
        'encoder.layers.{i}.norm1.{wb}': 'blocks.{i}.norm1.{wb}',
        'encoder.layers.{i}.attn.qkv.{wb}': 'blocks.{i}.attn.qkv.{wb}',
        'encoder.layers.{i}.attn.q_norm.weight': 'blocks.{i}.attn.q_norm.weight',
        'encoder.layers.{i}.attn.k_norm.weight': 'blocks.{i}.attn.k_norm.weight',
        'encoder.layers.{i}.attn.proj.{wb}': 'blocks.{i}.attn.proj.{wb}',
        'encoder.layers.{i}.ls1': 'blocks.{i}.ls1.gamma',
        'encoder.layers.{i}.norm2.{wb}': 'blocks.{i}.norm2.{wb}',
        'encoder.layers.{i}.mlp.fc1.{wb}': 'blocks.{i}.mlp.fc1.{wb}',
        'encoder.layers.{i}.mlp.fc2.{wb}': 'blocks.{i}.mlp.fc2.{wb}',
        'encoder.layers.{i}.ls2': 'blocks.{i}.ls2.gamma',
    }, ('cls_token', 'pos_embed', 'patch_embed', 'blocks')),
    'native': Layout('native', "transformers' native InternVLVisionModel", {
        'embeddings.class_embedding': 'embeddings.cls_token',
        'embeddings.position_embedding': 'embeddings.position_embeddings',
        'embeddings.patch_embedding.{wb}': 'embeddings.patch_embeddings.projection.{wb}',
        'encoder.layers.{i}.norm1.{wb}': 'encoder.layer.{i}.layernorm_before.{wb}',
        'encoder.layers.{i}.attn.qkv.{wb}': ('encoder.layer.{i}.attention.q_proj.{wb}',
                                             'encoder.layer.{i}.attention.k_proj.{wb}',
                                             'encoder.layer.{i}.attention.v_proj.{wb}'),
        'encoder.layers.{i}.attn.q_norm.weight': 'encoder.layer.{i}.attention.q_norm.weight',
        'encoder.layers.{i}.attn.k_norm.weight': 'encoder.layer.{i}.attention.k_norm.weight',
        'encoder.layers.{i}.attn.proj.{wb}': 'encoder.layer.{i}.attention.projection_layer.{wb}',
        'encoder.layers.{i}.ls1': 'encoder.layer.{i}.lambda_1',
        'encoder.layers.{i}.norm2.{wb}': 'encoder.layer.{i}.layernorm_after.{wb}',
        'encoder.layers.{i}.mlp.fc1.{wb}': 'encoder.layer.{i}.mlp.fc1.{wb}',
        'encoder.layers.{i}.mlp.fc2.{wb}': 'encoder.layer.{i}.mlp.fc2.{wb}',
        'encoder.layers.{i}.ls2': 'encoder.layer.{i}.lambda_2',
    }, ('embeddings', 'encoder', 'layernorm')),  # a final 'layernorm' is not InternViT: reported, not dropped
}


def _template_regex(template: str) -> re.Pattern:
    body = re.escape(template).replace(r'\{i\}', r'(?P<i>\d+)').replace(r'\{wb\}', r'(?P<wb>weight|bias)')
    return re.compile(r'^(?P<prefix>(?:.+\.)?)' + body + '$')


@dataclass(frozen=True)
class _Rule:
    canonical: str
    parts: tuple[str, ...]
    regexes: tuple[re.Pattern, ...]  # one per part, matching layout keys
    canonical_regex: re.Pattern


def _rules(layout: str) -> list[_Rule]:
    cached = _RULE_CACHE.get(layout)
    if cached is None:
        cached = []
        for canonical, target in LAYOUTS[layout].names.items():
            parts = target if isinstance(target, tuple) else (target,)
            cached.append(_Rule(canonical, parts, tuple(_template_regex(p) for p in parts),
                                _template_regex(canonical)))
        _RULE_CACHE[layout] = cached
    return cached


_RULE_CACHE: dict[str, list[_Rule]] = {}


def _match(key: str, layout: str):
    """(prefix, canonical name, part index, number of parts) for a layout key, or None."""
    for rule in _rules(layout):
        for part, regex in enumerate(rule.regexes):
            m = regex.match(key)
            if m:
                fields = {k: v for k, v in m.groupdict().items() if k != 'prefix' and v is not None}
                return m.group('prefix'), rule.canonical.format(**fields), part, len(rule.parts)
    return None


def detect_layout(keys: Iterable[str]) -> tuple[str, str]:
    """``(prefix, layout)`` under which most keys are InternViT tensors; raises if none is."""
    keys = list(keys)
    votes: Counter = Counter()
    for key in keys:
        for layout in LAYOUTS:
            hit = _match(key, layout)
            if hit:
                votes[(hit[0], layout)] += 1
    if not votes:
        raise WeightsError('no InternViT tensor in any known layout')
    ranked = votes.most_common()
    if len(ranked) > 1 and ranked[1][1] == ranked[0][1]:
        tied = ', '.join(f"{layout} under prefix '{prefix}'" for (prefix, layout), n in ranked if n == ranked[0][1])
        raise WeightsError(f'ambiguous: the same number of InternViT tensors in several places ({tied})')
    return ranked[0][0]


def _group(key: str) -> str:
    return key.split('.', 1)[0] + ('.*' if '.' in key else '')


def _describe_groups(keys: Iterable[str]) -> str:
    counts = Counter(_group(k) for k in keys)
    return ', '.join(f'{g} ({n})' for g, n in sorted(counts.items()))


def _plan(keys: Iterable[str]) -> tuple[str, str, list[str], list[str]]:
    """(prefix, layout, keys to read, keys ignored) for a checkpoint's key names."""
    keys = list(keys)
    prefix, layout = detect_layout(keys)
    namespaces = LAYOUTS[layout].namespaces
    selected, ignored = [], []
    for key in keys:
        if key.startswith(prefix) and key[len(prefix):].split('.', 1)[0] in namespaces:
            selected.append(key)
        else:
            ignored.append(key)
    return prefix, layout, selected, ignored


def to_canonical(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Convert a state dict in any layout (any prefix) to canonical names; returns ``(state_dict, layout)``.

    Tensors outside the backbone (heads, projector, LLM) are dropped with a log line naming their prefixes.
    Keys inside the backbone's namespace that match no rule are kept under their own name, so that loading
    reports them as unexpected instead of silently dropping them.
    """
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    prefix, layout, selected, ignored = _plan(tensors)
    if ignored:
        print_log(f'InternViT weights: ignored {len(ignored)} tensors outside the backbone: '
                  f'{_describe_groups(ignored)}', logger='current')
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, list] = {}
    for key in selected:
        hit = _match(key, layout)
        if hit is None or hit[0] != prefix:
            name = key[len(prefix):]
        else:
            _, name, part, nparts = hit
            if nparts > 1:
                pending.setdefault(name, [None] * nparts)[part] = tensors[key]
                continue
        if name in out:
            raise WeightsError(f'two tensors map to {name} (one is {key})')
        out[name] = tensors[key]
    for name, parts in pending.items():
        if any(p is None for p in parts):
            names = [tpl for tpl, p in zip(_split_names(name, layout, prefix), parts) if p is None]
            raise WeightsError(f'{name} is split in {len(parts)} tensors in the {layout} layout, but '
                               f'{", ".join(names)} is missing')
        out[name] = torch.cat(parts, dim=0)
    return out, layout


def _split_names(canonical: str, layout: str, prefix: str = '') -> tuple[str, ...]:
    for rule in _rules(layout):
        m = rule.canonical_regex.match(canonical)
        if m and m.group('prefix') == '':
            fields = {k: v for k, v in m.groupdict().items() if k != 'prefix' and v is not None}
            return tuple(prefix + p.format(**fields) for p in rule.parts)
    return (prefix + canonical,)


def from_canonical(state_dict: Mapping[str, torch.Tensor], layout: str, prefix: str = '') -> dict[str, torch.Tensor]:
    """Canonical state dict -> ``layout`` names (with ``prefix``); split tensors are chunked along dim 0."""
    if layout not in LAYOUTS:
        raise KeyError(f'unknown layout {layout!r}; known: {", ".join(LAYOUTS)}')
    out = {}
    for name, tensor in state_dict.items():
        names = _split_names(name, layout, prefix)
        if len(names) == 1:
            out[names[0]] = tensor
            continue
        if tensor.shape[0] % len(names):
            raise WeightsError(f'{name} of shape {tuple(tensor.shape)} cannot be split in {len(names)}')
        for part_name, part in zip(names, tensor.chunk(len(names), dim=0)):
            out[part_name] = part
    return out


# ------------------------------------------------------------------------------------------------- reading
@dataclass
class Weights:
    """Canonical tensors read from a checkpoint, with what is known about where they came from."""

    state_dict: dict[str, torch.Tensor]
    hf_config: dict | None  # InternVisionConfig fields (the vision config) when the checkpoint has one
    layout: str
    source: str


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


def safe_torch_load(path: str | os.PathLike, any_object: bool = False) -> Any:
    """``torch.load(weights_only=True)`` on CPU, with errors that name the file.

    MMEngine training checkpoints also pickle their message hub and numpy scalars; those objects are replaced by
    inert stand-ins (nothing of theirs runs), so the tensors and plain metadata of any run's checkpoint can be
    read safely. Any other non-tensor global stays refused (``WeightsError``), unless ``any_object``: then every
    global gets a stand-in (for files whose tensors are wanted beside foreign objects, e.g. the published probe
    head's yacs config); a dict subclass becomes a plain ``OrderedDict`` of its (equally inert) contents.
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
            if refused and not any_object:
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
            print_log(f'{path}: non-tensor objects ({", ".join(sorted(names))}) were not unpickled '
                      f'(replaced by inert stand-ins); tensors read with weights_only=True', logger='current')
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
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            return {k: f.get_tensor(k) for k in keys}
    except Exception as err:
        raise _safetensors_error(path, err) from None


def _checkpoint_error(path: Path, err: WeightsError) -> WeightsError:
    return WeightsError(f'{path} loads nothing: {err}' if 'no InternViT tensor' in str(err) else f'{path}: {err}')


def _backbone_keys(keys: Iterable[str], path: Path, what: str = 'backbone') -> list[str]:
    """The keys that belong to the InternViT in a checkpoint; the rest is logged as ignored."""
    try:
        _, _, selected, ignored = _plan(keys)
    except WeightsError as err:
        raise _checkpoint_error(path, err) from None
    if ignored:
        print_log(f'{path}: ignored {len(ignored)} tensors outside the {what}: {_describe_groups(ignored)}',
                  logger='current')
    return selected


def _read_file(path: Path) -> Weights:
    if path.suffix == '.safetensors':
        tensors = _safetensors_read(path, _backbone_keys(_safetensors_keys(path), path))
    else:
        everything, trail = _unwrap(safe_torch_load(path), path)
        if trail:
            print_log(f"{path}: reading {''.join(f'[{k!r}]' for k in trail)}", logger='current')
        try:
            tensors = {k: everything[k] for k in _backbone_keys(everything, path)}
        except WeightsError as err:
            hint = _probe_checkpoint_hint(everything)
            raise (WeightsError(f'{err}. {hint}') if hint else err) from None
    sd, layout = to_canonical(tensors)
    return Weights(sd, None, layout, str(path))


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


def vision_config_of(config: dict | None) -> dict | None:
    """The vision config of an HF config.json (chat or vision-only), as InternVisionConfig fields."""
    if config is None:
        return None
    vision = config.get('vision_config', config)
    if not isinstance(vision, dict) or 'hidden_size' not in vision:
        return None
    if vision.get('model_type') == 'internvl_vision' or 'use_qk_norm' in vision or 'attention_bias' in vision:
        return _config_from_native(vision)
    return dict(vision)


def _square(value, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise WeightsError(f'InternViT needs a square {what}, got {value}')
        return int(value[0])
    return int(value)


def _config_from_native(native: dict) -> dict:
    return {
        'hidden_size': native['hidden_size'],
        'num_hidden_layers': native.get('num_hidden_layers', 24),
        'num_attention_heads': native.get('num_attention_heads', 16),
        'intermediate_size': native.get('intermediate_size', 4096),
        'patch_size': _square(native.get('patch_size', 14), 'patch_size'),
        'image_size': _square(native.get('image_size', 448), 'image_size'),
        'num_channels': native.get('num_channels', 3),
        'qkv_bias': native.get('attention_bias', False),
        'qk_normalization': native.get('use_qk_norm', False),
        'norm_type': native.get('norm_type', 'layer_norm'),
        'layer_norm_eps': native.get('layer_norm_eps', 1e-6),
        'initializer_factor': native.get('layer_scale_init_value', 0.1),
    }


def _read_dir(directory: Path) -> Weights:
    config = _read_config(directory)
    files = weight_files(directory)
    selected = _backbone_keys(files, directory, 'vision backbone')
    shards = sorted({files[k].name for k in selected})
    if len(set(files.values())) > 1:
        print_log(f'{directory}: reading {len(selected)} vision tensors from {len(shards)} of '
                  f'{len(set(files.values()))} weight files', logger='current')
    sd, layout = to_canonical(read_tensors(files, selected))
    return Weights(sd, vision_config_of(config), layout, str(directory))


def read_weights(path: str | os.PathLike) -> Weights:
    """Read InternViT weights in any supported layout from a file or an HF/chat directory (canonical names)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    return _read_dir(p) if p.is_dir() else _read_file(p)


# ------------------------------------------------------------------------------------------------- architecture
def _layer_indices(keys: Iterable[str]) -> list[int]:
    return sorted({int(m.group(1)) for m in map(_LAYER_RE.match, keys) if m})


def _infer_from_tensors(sd: Mapping[str, torch.Tensor]) -> dict:
    if PATCH_KEY not in sd:
        raise WeightsError(f'cannot infer the architecture: {PATCH_KEY} is missing')
    width, in_chans, patch, _ = sd[PATCH_KEY].shape
    layers = _layer_indices(sd)
    if not layers:
        raise WeightsError('cannot infer the architecture: the checkpoint has no encoder layers')
    first = f'encoder.layers.{layers[0]}.'
    fields = dict(embed_dim=int(width), in_chans=int(in_chans), patch_size=int(patch), depth=layers[-1] + 1,
                  qkv_bias=first + 'attn.qkv.bias' in sd, qk_norm=first + 'attn.q_norm.weight' in sd,
                  norm_type='layer_norm' if first + 'norm1.bias' in sd else 'rms_norm')
    if first + 'mlp.fc1.weight' in sd:
        fields['mlp_dim'] = int(sd[first + 'mlp.fc1.weight'].shape[0])
    if POS_KEY in sd:
        n = sd[POS_KEY].shape[1] - 1
        side = math.isqrt(n)
        if side * side != n:
            raise WeightsError(f'{POS_KEY} has {n} patch positions, which is not a square grid')
        fields['img_size'] = side * int(patch)
    return fields


_DEFAULT_HEADS = {3200: 25, 1024: 16}


def arch_for_weights(weights: Weights, num_heads: int | None = None) -> InternViTArch:
    """The architecture of a checkpoint: shapes from its tensors, the rest from its HF config when it has one.

    The config and the tensors must agree; ``num_heads`` cannot be read from tensors, so it comes from the config,
    the argument, or the published models (25 heads for width 3200, 16 for width 1024).
    """
    inferred = _infer_from_tensors(weights.state_dict)
    fields = dict(inferred)
    config = weights.hf_config
    if config:
        from_config = {
            'embed_dim': config.get('hidden_size'), 'depth': config.get('num_hidden_layers'),
            'mlp_dim': config.get('intermediate_size'), 'patch_size': config.get('patch_size'),
            'img_size': config.get('image_size'), 'in_chans': config.get('num_channels'),
            'qkv_bias': config.get('qkv_bias'), 'qk_norm': config.get('qk_normalization'),
            'norm_type': config.get('norm_type'),
        }
        for name, value in from_config.items():
            if value is None:
                continue
            if name == 'img_size':
                value = _square(value, 'image_size')
            if name in inferred and inferred[name] != value:
                raise WeightsError(f'{weights.source}: config.json says {name}={value!r} but the tensors say '
                                   f'{inferred[name]!r}')
            fields[name] = value
        if config.get('layer_norm_eps') is not None:
            fields['norm_eps'] = float(config['layer_norm_eps'])
        if config.get('initializer_factor') is not None:
            fields['layer_scale_init'] = float(config['initializer_factor'])
        config_heads = config.get('num_attention_heads')
        if config_heads is not None:
            if num_heads is not None and num_heads != config_heads:
                raise WeightsError(f'num_heads={num_heads} contradicts {weights.source} '
                                   f'(num_attention_heads={config_heads})')
            num_heads = config_heads
    if num_heads is None:
        num_heads = _DEFAULT_HEADS.get(fields['embed_dim'])
        if num_heads is None:
            raise WeightsError(f'{weights.source}: the number of attention heads cannot be read from the weights '
                               f'(width {fields["embed_dim"]}); pass num_heads (--num-heads)')
    if 'mlp_dim' not in fields:
        raise WeightsError(f'{weights.source}: cannot infer the MLP width (no mlp.fc1.weight)')
    fields.setdefault('img_size', 224)
    try:
        return InternViTArch(num_heads=int(num_heads), **fields)
    except ValueError as err:
        raise WeightsError(f'{weights.source}: {err}') from None


def hf_config_from_arch(arch: InternViTArch, image_size: int | None = None) -> dict:
    """config.json of a published-style HF ``InternVisionModel`` (``InternVisionConfig`` fields)."""
    image_size = int(image_size or arch.img_size)
    if image_size % arch.patch_size:
        raise ValueError(f'image_size {image_size} is not a multiple of patch_size {arch.patch_size}')
    return {
        'architectures': ['InternVisionModel'],
        'model_type': 'intern_vit_6b',
        'num_channels': arch.in_chans,
        'patch_size': arch.patch_size,
        'image_size': image_size,
        'qkv_bias': arch.qkv_bias,
        'hidden_size': arch.embed_dim,
        'num_attention_heads': arch.num_heads,
        'intermediate_size': arch.mlp_dim,
        'qk_normalization': arch.qk_norm,
        'num_hidden_layers': arch.depth,
        'use_flash_attn': True,
        'hidden_act': 'gelu',
        'norm_type': arch.norm_type,
        'layer_norm_eps': arch.norm_eps,
        'dropout': 0.0,
        'drop_path_rate': 0.0,
        'attention_dropout': 0.0,
        'initializer_range': 0.02,
        'initializer_factor': arch.layer_scale_init,
        'torch_dtype': 'bfloat16',
    }


def native_config_from_arch(arch: InternViTArch, image_size: int | None = None) -> dict:
    """config.json of transformers' ``InternVLVisionModel`` for the same network (no final norm: mean pooling)."""
    image_size = int(image_size or arch.img_size)
    if image_size % arch.patch_size:
        raise ValueError(f'image_size {image_size} is not a multiple of patch_size {arch.patch_size}')
    return {
        'architectures': ['InternVLVisionModel'],
        'model_type': 'internvl_vision',
        'hidden_size': arch.embed_dim,
        'num_hidden_layers': arch.depth,
        'num_attention_heads': arch.num_heads,
        'attention_bias': arch.qkv_bias,
        'use_qk_norm': arch.qk_norm,
        'intermediate_size': arch.mlp_dim,
        'hidden_act': 'gelu',
        'hidden_dropout_prob': 0.0,
        'attention_dropout': 0.0,
        'projection_dropout': 0.0,
        'initializer_range': 0.02,
        'norm_type': arch.norm_type,
        'layer_norm_eps': arch.norm_eps,
        'image_size': [image_size, image_size],
        'patch_size': [arch.patch_size, arch.patch_size],
        'num_channels': arch.in_chans,
        'use_mask_token': False,
        'use_absolute_position_embeddings': True,
        'layer_scale_init_value': arch.layer_scale_init,
        'use_mean_pooling': True,
        'dtype': 'bfloat16',
    }


# ------------------------------------------------------------------------------------------------- loading
def _expected_shapes(arch: InternViTArch) -> dict[str, torch.Size]:
    from .internvit import InternViT
    with torch.device('meta'):
        model = InternViT(arch)
    return {k: v.shape for k, v in model.state_dict().items()}


def _few(names: Iterable[str], n: int = 5) -> str:
    names = sorted(names, key=_natural_key)
    shown = ', '.join(names[:n])
    return f'{shown} and {len(names) - n} more' if len(names) > n else shown


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


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


def _detect_or_none(keys: Iterable[str]) -> tuple[str, str] | None:
    """``detect_layout``, or None where no key is an InternViT tensor (the caller then reports what is wrong)."""
    try:
        return detect_layout(keys)
    except WeightsError:
        return None


# ------------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory next to ``out_dir``; it becomes ``out_dir`` only once complete."""
    out = Path(out_dir).expanduser().absolute()
    _refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
        _refuse_existing(out, overwrite)
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f'.{out.name}.old-', dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f'{out} already exists; pass overwrite=True (--overwrite) to replace it')


def _as_torch_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    from .internvit import as_dtype
    return as_dtype(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace('torch.', '')


def _prepare_export(state_dict: Mapping[str, torch.Tensor], arch: InternViTArch, image_size: int | None,
                    source: str) -> tuple[dict[str, torch.Tensor], InternViTArch]:
    if _detect_or_none(state_dict) not in (None, ('', 'hf')):
        state_dict, _ = to_canonical(state_dict)
    target = replace(arch, img_size=int(image_size or arch.img_size))
    sd = dict(state_dict)
    _resample_to_grid(sd, target.grid_size, source)
    sd = _check(sd, _expected_shapes(target), target.depth, source, strict=True)
    return sd, target


def json_dump(obj: Any, path: Path) -> None:
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + '\n')
    os.replace(tmp, path)


def save_safetensors_shards(tensors: Mapping[str, torch.Tensor], out: Path, max_shard_bytes: int,
                      metadata: dict | None = None) -> list[str]:
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json above the size."""
    from safetensors.torch import save_file
    names = sorted(tensors, key=_natural_key)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    metadata = metadata or {'format': 'pt'}
    if len(shards) == 1:
        files = ['model.safetensors']
    else:
        files = [f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors' for k in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
        # Each file under a temporary name first, so a directory written in place never holds half a file.
        tmp = out / f'.{file}.tmp'
        save_file({n: tensors[n].contiguous().clone() for n in shard}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out / file)
        weight_map.update({n: file for n in shard})
        print_log(f'wrote {out.name}/{file} ({len(shard)} tensors)', logger='current')
    index = out / 'model.safetensors.index.json'
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        json_dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, index)
        files.append(index.name)
    elif index.exists():
        index.unlink()  # a stale index from an earlier sharded save would point at the wrong files
    return files


def write_hf(state_dict: Mapping[str, torch.Tensor], arch: InternViTArch, out_dir: str | os.PathLike, *,
             image_size: int | None = None, dtype=torch.bfloat16, max_shard_bytes: int = 5 * 2 ** 30,
             overwrite: bool = False) -> Path:
    """Write an HF ``InternVisionModel`` directory (config.json + safetensors), loadable by the published code.

    The position embedding is resampled to ``image_size`` (default: the arch's) and config.json says so.
    Written into a temporary directory beside ``out_dir`` and renamed at the end; an existing ``out_dir`` is
    refused unless ``overwrite``, and then replaced only once the new one is complete.
    """
    out = Path(out_dir)
    _refuse_existing(out.expanduser().absolute(), overwrite)
    dtype = _as_torch_dtype(dtype)
    sd, target = _prepare_export(state_dict, arch, image_size, str(out))
    config = hf_config_from_arch(target)
    tensors = {k: v.detach().to(dtype) if dtype else v.detach() for k, v in sd.items()}
    config['torch_dtype'] = _dtype_name(dtype or next(iter(tensors.values())).dtype)
    with atomic_dir(out, overwrite) as tmp:
        json_dump(config, tmp / 'config.json')
        save_safetensors_shards(tensors, tmp, max_shard_bytes)
    print_log(f'wrote HF InternVisionModel directory {out} ({target.depth} layers, {target.img_size}px, '
              f'{config["torch_dtype"]})', logger='current')
    return out


def write_hf_native(state_dict: Mapping[str, torch.Tensor], arch: InternViTArch, out_dir: str | os.PathLike, *,
                    image_size: int | None = None, dtype=torch.bfloat16, max_shard_bytes: int = 5 * 2 ** 30,
                    overwrite: bool = False) -> Path:
    """Write the vision tower in transformers' native layout (``InternVLVisionModel.from_pretrained(out_dir)``).

    Same atomicity rules as ``write_hf``. transformers' q/k norms use eps 1e-6 whatever the config says, so an
    arch with qk-norm and another eps is refused rather than written wrong.
    """
    if arch.qk_norm and arch.norm_eps != 1e-6:
        raise WeightsError(f"transformers' InternVLVisionModel fixes the q/k-norm eps at 1e-6; this arch has "
                           f'{arch.norm_eps}')
    out = Path(out_dir)
    _refuse_existing(out.expanduser().absolute(), overwrite)
    dtype = _as_torch_dtype(dtype)
    sd, target = _prepare_export(state_dict, arch, image_size, str(out))
    tensors = {k: v.detach().to(dtype) if dtype else v.detach() for k, v in from_canonical(sd, 'native').items()}
    config = native_config_from_arch(target)
    config['dtype'] = _dtype_name(dtype or next(iter(tensors.values())).dtype)
    with atomic_dir(out, overwrite) as tmp:
        json_dump(config, tmp / 'config.json')
        save_safetensors_shards(tensors, tmp, max_shard_bytes)
    print_log(f'wrote native InternVLVisionModel directory {out}', logger='current')
    return out


# ------------------------------------------------------------------------------------------------- chat export
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


def _is_within(path: Path, other: Path) -> bool:
    try:
        path.relative_to(other)
        return True
    except ValueError:
        return False


def write_into_chat(state_dict: Mapping[str, torch.Tensor], chat_dir: str | os.PathLike,
                    out_dir: str | os.PathLike, *, overwrite: bool = False, source: str = 'source') -> Path:
    """A new directory ``out_dir``: a copy of the chat checkpoint with its vision tensors replaced.

    Each replaced tensor keeps the chat checkpoint's name, shape (checked) and dtype; the position embedding is
    resampled to the chat's vision image size. Weight files without vision tensors and all other files are
    copied byte for byte; files with vision tensors are rewritten with their other tensors unchanged. The chat
    directory itself is never written.
    """
    chat = Path(chat_dir).expanduser().absolute()
    out = Path(out_dir).expanduser().absolute()
    if not chat.is_dir():
        raise FileNotFoundError(f'chat checkpoint directory {chat_dir} does not exist')
    if out.resolve() == chat.resolve() or _is_within(out.resolve(), chat.resolve()) or \
            _is_within(chat.resolve(), out.resolve()):
        raise WeightsError(f'refusing to write {out} over or inside the chat checkpoint {chat}: '
                           'the export is never made in place; choose another output directory')
    _refuse_existing(out, overwrite)
    config = _read_config(chat)
    vision = vision_config_of(config)
    if vision is None or 'vision_config' not in (config or {}):
        raise WeightsError(f'{chat} is not an InternVL-Chat checkpoint: its config.json has no vision_config')
    files = weight_files(chat)
    try:
        prefix, layout, selected, _ = _plan(files)
    except WeightsError as err:
        raise _checkpoint_error(chat, err) from None
    grid = _square(vision['image_size'], 'image_size') // _square(vision['patch_size'], 'patch_size')

    sd = dict(state_dict)
    if _detect_or_none(sd) not in (None, ('', 'hf')):
        sd, _ = to_canonical(sd)
    _resample_to_grid(sd, grid, source)
    new = from_canonical(sd, layout, prefix)
    specs = _tensor_specs(files, selected)
    missing = [k for k in specs if k not in new]
    extra = [k for k in new if k not in specs]
    if missing or extra:
        problems = []
        chat_layers = len(_layer_indices(_canonical_names(specs, layout, prefix)))
        if chat_layers != len(_layer_indices(sd)):
            problems.append(f'the chat vision model has {chat_layers} layers, the source {len(_layer_indices(sd))}')
        if missing:
            problems.append(f'the chat checkpoint has {len(missing)} vision tensors the source lacks: '
                            f'{_few(missing)}')
        if extra:
            problems.append(f'the source has {len(extra)} tensors the chat vision model lacks: {_few(extra)}')
        raise WeightsError(f'{source} does not fit {chat}: ' + '; '.join(problems))
    mismatched = [f'{k}: source {tuple(new[k].shape)} vs chat {specs[k][0]}' for k in specs
                  if tuple(new[k].shape) != specs[k][0]]
    if mismatched:
        raise WeightsError(f'{source} does not fit {chat}: shape mismatch in {len(mismatched)} tensors: '
                           + '; '.join(mismatched[:5]) + (f'; and {len(mismatched) - 5} more'
                                                         if len(mismatched) > 5 else ''))
    touched = {files[k] for k in specs}
    with atomic_dir(out, overwrite) as tmp:
        for item in _walk_files(chat):
            rel = item.relative_to(chat)
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if item in touched:
                _rewrite_weight_file(item, target, {k: new[k].to(specs[k][1]) for k in specs if files[k] == item})
                shutil.copymode(item, target)
                print_log(f'rewrote {rel} (vision tensors replaced)', logger='current')
            else:
                shutil.copyfile(item, target)  # follows symlinks (HF cache snapshots): a real copy
                shutil.copystat(item, target)
        print_log(f'copied {chat} with {len(specs)} vision tensors replaced in {len(touched)} weight file(s)',
                  logger='current')
    return out


def _walk_files(root: Path) -> list[Path]:
    """Every file under root, following symlinked directories (HF cache snapshots are symlinks)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames))
    return found


def _canonical_names(keys: Iterable[str], layout: str, prefix: str) -> list[str]:
    names = []
    for key in keys:
        hit = _match(key, layout)
        if hit and hit[0] == prefix:
            names.append(hit[1])
    return names


def _rewrite_weight_file(src: Path, dst: Path, replacements: Mapping[str, torch.Tensor]) -> None:
    if src.suffix == '.safetensors':
        from safetensors import safe_open
        from safetensors.torch import save_file
        try:
            with safe_open(str(src), framework='pt') as f:
                metadata = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:
            raise _safetensors_error(src, err) from None
        tensors.update({k: v.contiguous() for k, v in replacements.items()})
        save_file(tensors, str(dst), metadata=metadata)
    else:
        obj = safe_torch_load(src)
        if not isinstance(obj, dict) or not all(k in obj for k in replacements):
            raise WeightsError(f'cannot rewrite {src}: it is not a flat state dict')
        obj = dict(obj)
        obj.update({k: v.contiguous().clone() for k, v in replacements.items()})
        torch.save(obj, dst)
