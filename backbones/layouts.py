"""InternViT weight layouts as data: name tables, layout detection, conversion through the canonical state dict.

The canonical layout is the model's own state dict, which uses the Hugging Face ``InternVisionModel`` names
(``embeddings.*``, ``encoder.layers.{i}.*``). Every other layout is one table in ``LAYOUTS`` that maps canonical
names to that layout's names; a tuple of names means the canonical tensor is split along dim 0 (transformers'
native InternVL keeps q, k and v apart where InternViT has one ``qkv``). Prefixes (``backbone.``,
``vision_model.``, ``vision_tower.``, ``module.`` ...) are not part of a layout: they are found from the key names.

Layouts (read by ``backbones.reading.read_weights``, written by ``backbones.writing``):
  * ``hf``: HF ``InternVisionModel`` and InternVL-Chat (``vision_model.*``);
  * ``original``: the original segmentation/classification ``.pth`` (``cls_token``, ``blocks.{i}.*``);
  * ``native``: transformers' ``InternVLVisionModel`` (``*-hf`` repos, ``vision_tower.`` / ``model.vision_tower.``).
A new layout is one more entry in ``LAYOUTS``.
"""
from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

logger = logging.getLogger(__name__)

__all__ = ['Weights', 'WeightsError', 'LAYOUTS', 'Layout', 'CANONICAL_NAMES', 'detect_layout', 'to_canonical',
           'from_canonical']

POS_KEY = 'embeddings.position_embedding'


PATCH_KEY = 'embeddings.patch_embedding.weight'


_LAYER_RE = re.compile(r'^encoder\.layers\.(\d+)\.')


class WeightsError(ValueError):
    """A checkpoint that cannot be read, converted or loaded; the message names the file or tensor."""


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


@functools.lru_cache(maxsize=1 << 16)  # one load matches the same names several times
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
        logger.info(f'InternViT weights: ignored {len(ignored)} tensors outside the backbone: '
                  f'{_describe_groups(ignored)}')
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


def as_canonical(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The state dict under canonical names: converted unless it already is (or holds no InternViT tensor at all,
    which the caller then reports with its own context)."""
    if _detect_or_none(state_dict) in (None, ('', 'hf')):
        return state_dict
    return to_canonical(state_dict)[0]


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


def _layer_indices(keys: Iterable[str]) -> list[int]:
    return sorted({int(m.group(1)) for m in map(_LAYER_RE.match, keys) if m})


def _few(names: Iterable[str], n: int = 5) -> str:
    names = sorted(names, key=_natural_key)
    shown = ', '.join(names[:n])
    return f'{shown} and {len(names) - n} more' if len(names) > n else shown


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def _detect_or_none(keys: Iterable[str]) -> tuple[str, str] | None:
    """``detect_layout``, or None where no key is an InternViT tensor (the caller then reports what is wrong)."""
    try:
        return detect_layout(keys)
    except WeightsError:
        return None


def _canonical_names(keys: Iterable[str], layout: str, prefix: str) -> list[str]:
    names = []
    for key in keys:
        hit = _match(key, layout)
        if hit and hit[0] == prefix:
            names.append(hit[1])
    return names


@dataclass
class Weights:
    """Canonical tensors read from a checkpoint, with what is known about where they came from."""

    state_dict: dict[str, torch.Tensor]
    hf_config: dict | None  # InternVisionConfig fields (the vision config) when the checkpoint has one
    layout: str
    source: str
