"""Probe checkpoints: strict head loading, for this project's files and for the published InternVL head.

Two layouts are read:

* this project's MMEngine checkpoints: ``state_dict`` with ``heads.<i>.*`` (and ``ema_heads.<i>.*``), the
  ``selected_head`` buffer and the probe record (``_extra_state``: the backbone's sha256, the head names);
* the published InternVL trainer's head file (``intern_vit_6b_224px_head.pth``, SwinTransformer-style):
  ``{'model': {...}, ...}`` with ``norm.*`` (BatchNorm1d), ``head.*`` (Linear) and, for the attention-pooling
  probe, ``attn_pooling.*``; optionally ``model_ema`` with the same names. Older files have no ``norm.*``.
  The file may also pickle its optimizer state, a yacs config and numbers: it is read with the project's safe
  reader, the yacs config (``PUBLISHED_FILE_OBJECTS``) and numpy scalars replaced by inert stand-ins, never
  unpickled in full. ``load_from`` / ``tools/test.py`` read it through the shared strict loading, with the
  converter ``classification`` registers (``model.published_head_to_probe_state``).

Either way every head tensor the model has must be in the file with its shape and nothing may be left over;
anything else is a ``ProbeCheckpointError`` naming the tensors (and the file, where the caller knows it).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from backbones.layouts import WeightsError
from backbones.loading import compare_state_dicts

# Published trainer names -> this project's names inside one head (``heads.<i>.``).
PUBLISHED_NAMES = (
    ('norm.', 'norm.'),
    ('head.', 'fc.'),
    ('attn_pooling.norm1_q.', 'pool.norm_q.'),
    ('attn_pooling.norm1_k.', 'pool.norm_k.'),
    ('attn_pooling.norm1_v.', 'pool.norm_v.'),
    ('attn_pooling.cross_attn.q.', 'pool.q.'),
    ('attn_pooling.cross_attn.k.', 'pool.k.'),
    ('attn_pooling.cross_attn.v.', 'pool.v.'),
    ('attn_pooling.cross_attn.q_bias', 'pool.q_bias'),
    ('attn_pooling.cross_attn.k_bias', 'pool.k_bias'),
    ('attn_pooling.cross_attn.v_bias', 'pool.v_bias'),
    ('attn_pooling.cross_attn.proj.', 'pool.proj.'),
)


# Foreign objects the published trainer pickles beside the head (its yacs config): read as inert plain dicts.
PUBLISHED_FILE_OBJECTS = ('yacs.config.CfgNode',)


class ProbeCheckpointError(WeightsError):
    """A probe checkpoint does not fit the model exactly (missing, extra or misshapen head tensors)."""


def read_probe_checkpoint(path: str):
    """The checkpoint's tensors and plain metadata; the published file's yacs config and MMEngine's message hub
    become inert stand-ins, any other pickled object is refused."""
    from backbones.reading import safe_torch_load
    return safe_torch_load(path, stand_ins=PUBLISHED_FILE_OBJECTS)


def is_published_layout(state: Mapping) -> bool:
    """The published trainer's file (``{'model': {'head.weight': ...}}``) or its bare ``model`` dict."""
    inner = state.get('model') if isinstance(state.get('model'), Mapping) else state
    return isinstance(inner, Mapping) and isinstance(inner.get('head.weight'), torch.Tensor) \
        and '_extra_state' not in state


def _ours(name: str) -> str:
    for published, own in PUBLISHED_NAMES:
        if name.startswith(published):
            return own + name[len(published):]
    return name


def _published(name: str) -> str:
    for published, own in PUBLISHED_NAMES:
        if name.startswith(own):
            return published + name[len(own):]
    return name


def _tensors(obj: Mapping, where: str) -> dict[str, torch.Tensor]:
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ProbeCheckpointError(f'{where} holds non-tensor entries {bad[:5]}')
    return dict(obj)


def check_head_state(expected: Mapping[str, torch.Size], given: Mapping[str, torch.Tensor], rename=None,
                     hint: str = '') -> None:
    """Every expected tensor present with its shape, nothing else; errors name the tensors (as the file does)."""
    mismatch = compare_state_dicts(given, expected)
    if mismatch:
        raise ProbeCheckpointError('the checkpoint does not fit the probe heads exactly: '
                                   + '; '.join(mismatch.describe(rename=rename)) + (f'. {hint}' if hint else ''))


def published_to_probe_state(state: Mapping, head_names: list[str], has_ema: bool,
                             expected: Mapping[str, torch.Size]) -> tuple[dict[str, torch.Tensor], bool]:
    """The published file's head (``model``) as ``heads.0.*`` (and ``model_ema`` as ``ema_heads.0.*``), checked
    strictly against ``expected`` (the model's own head names and shapes). Returns (state, EMA weights found)."""
    if len(head_names) != 1:
        raise ProbeCheckpointError(f'a published head file holds one head, but this model has {len(head_names)} '
                                   f'(a sweep); evaluate it with model.sweep=False')
    plain = _tensors(state['model'] if isinstance(state.get('model'), Mapping) else state, "the file's 'model'")
    ema = state.get('model_ema') if isinstance(state.get('model_ema'), Mapping) else None
    converted = {f'heads.0.{_ours(k)}': v for k, v in plain.items()}
    if has_ema and ema is not None:
        converted.update({f'ema_heads.0.{_ours(k)}': v for k, v in _tensors(ema, "the file's 'model_ema'").items()})
    wanted = {k: s for k, s in expected.items() if k.startswith('heads.') or (
        k.startswith('ema_heads.') and has_ema and ema is not None)}

    def rename(name: str) -> str:
        if name.startswith('heads.0.'):
            return _published(name[len('heads.0.'):])
        if name.startswith('ema_heads.0.'):
            return 'model_ema/' + _published(name[len('ema_heads.0.'):])
        return name

    hint = ''
    if any(k.startswith('heads.0.norm.') for k in wanted) and not any('.norm.' in k for k in converted):
        hint = 'This looks like the older published head without BatchNorm: set model.head_norm=False'
    elif any(k.startswith('norm.') for k in plain) and not any('.norm.' in k for k in wanted):
        hint = 'The file has a BatchNorm (norm.*): set model.head_norm=True'
    elif any(k.startswith(('blocks.', 'patch_embed.', 'pos_embed', 'cls_token')) for k in plain):
        hint = ("This is a full training checkpoint (backbone included); the backbone comes from the config's "
                "pretrained=, so save only its head: {k: v for k, v in ckpt['model'].items() if "
                "k.startswith(('norm.', 'head.', 'attn_pooling.'))}")
    check_head_state(wanted, converted, rename, hint)
    if has_ema and ema is None:  # no EMA weights in the file: the EMA copy holds the plain head (not evaluated)
        converted.update({'ema_' + k: v.clone() for k, v in converted.items()})
    return converted, ema is not None
