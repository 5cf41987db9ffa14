"""Layer-wise learning-rate decay for InternViT (mmseg's own constructor only knows ConvNeXt/BEiT/MAE names).

Layer ids follow InternViT's parameter names: ``backbone.embeddings.*`` is layer 0, ``backbone.encoder.layers.{i}.*``
is layer ``i + 1``, everything else (neck, heads) is layer ``num_layers + 1`` and keeps the base lr. A parameter at
layer ``l`` gets ``lr = base_lr * layer_decay_rate ** (num_layers + 1 - l)``.

No weight decay for norms (``norm1``/``norm2``/``q_norm``/``k_norm`` and every norm layer in neck and heads), biases
and layer scale (``ls1``/``ls2``). ``position_embedding`` and ``class_embedding`` get the base weight decay by default,
as in the published runs (their constructor exempted 1-D tensors, biases and the names ``pos_embed``/``cls_token``,
which never matched the prefixed names it saw); ``paramwise_cfg.embeddings_weight_decay=False`` exempts them.
The rule reads parameter names and the type of the module that owns each parameter, not shapes: under FSDP
(``use_orig_params``) every parameter the optimizer sees is a flat 1-D shard.
"""
from __future__ import annotations

import re
from typing import List

from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

from backbones.internvit import RMSNorm

from ._registry import register_everywhere
from .neck import LayerNorm2d

# Wrappers that insert a path component into parameter names (FSDP units with use_orig_params, checkpoint wrapper).
_WRAPPER_COMPONENTS = re.compile(r'(?:^|(?<=\.))(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.')
_BLOCK = re.compile(r'^backbone\.encoder\.layers\.(\d+)\.')
NO_DECAY_NAMES = ('bias', 'ls1', 'ls2')
EMBEDDING_NAMES = ('position_embedding', 'class_embedding')
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, RMSNorm, LayerNorm2d)


def clean_param_name(name: str) -> str:
    """The parameter name without wrapper components, e.g. ``_fsdp_wrapped_module.`` inserted by FSDP."""
    return _WRAPPER_COMPONENTS.sub('', name)


def internvit_layer_id(name: str, num_layers: int) -> int:
    """Layer id of a parameter of a segmentor with an InternViT backbone (0 .. num_layers + 1)."""
    name = clean_param_name(name)
    if name.startswith('backbone.embeddings.'):
        return 0
    block = _BLOCK.match(name)
    if block:
        index = int(block.group(1))
        if index >= num_layers:
            raise ValueError(f'parameter {name} belongs to block {index}, but paramwise_cfg.num_layers is '
                             f'{num_layers}; set num_layers to the backbone depth')
        return index + 1
    return num_layers + 1


def is_no_decay(name: str, owner: nn.Module, embeddings_weight_decay: bool = True) -> bool:
    leaf = name.split('.')[-1]
    return (isinstance(owner, NORM_TYPES) or leaf in NO_DECAY_NAMES
            or (not embeddings_weight_decay and leaf in EMBEDDING_NAMES))


def named_parameters_with_owner(module: nn.Module):
    """(name, parameter, owning module) for every parameter once, names as ``named_parameters`` gives them."""
    seen = set()
    for module_name, owner in module.named_modules():
        for name, param in owner.named_parameters(prefix=module_name, recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield name, param, owner


@register_everywhere('OPTIM_WRAPPER_CONSTRUCTORS')
class InternViTLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Optimizer constructor with layer-wise lr decay and no weight decay on norms/biases/layer scale/embeddings.

    ``paramwise_cfg``:
        layer_decay_rate (float): per-layer lr factor (the published full tuning of 6B uses 0.95); 1.0 turns decay
            off but keeps the weight-decay exemptions.
        num_layers (int, optional): backbone depth; read from ``model.backbone.depth`` when left out.
        embeddings_weight_decay (bool): weight decay on ``position_embedding`` / ``class_embedding`` (default
            True, as published); False exempts them like norms and biases.

    Frozen parameters (``requires_grad=False``) are left out of the optimizer. The group table is logged once
    (under FSDP its element counts are this rank's shards).
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None):
        paramwise_cfg = dict(paramwise_cfg or {})
        paramwise_cfg.setdefault('layer_decay_rate', 1.0)  # non-empty: MMEngine then calls add_params
        unknown = set(paramwise_cfg) - {'layer_decay_rate', 'num_layers', 'embeddings_weight_decay'}
        if unknown:
            raise KeyError(f'InternViTLayerDecayOptimizerConstructor: unknown paramwise_cfg keys {sorted(unknown)}; '
                           f'known: layer_decay_rate, num_layers, embeddings_weight_decay')
        rate = paramwise_cfg['layer_decay_rate']
        if not 0 < rate <= 1:
            raise ValueError(f'paramwise_cfg.layer_decay_rate must be in (0, 1], got {rate}')
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    def _num_layers(self, module: nn.Module) -> int:
        configured = self.paramwise_cfg.get('num_layers')
        backbone = getattr(module.module if is_model_wrapper(module) else module, 'backbone', None)
        depth = getattr(backbone, 'depth', None)
        if configured is None and depth is None:
            raise ValueError('InternViTLayerDecayOptimizerConstructor: the model has no backbone.depth; '
                             'set paramwise_cfg.num_layers')
        if configured is not None and depth is not None and configured != depth:
            raise ValueError(f'paramwise_cfg.num_layers={configured} does not match the backbone depth {depth}')
        return int(configured if configured is not None else depth)

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = '', **kwargs) -> None:
        num_layers = self._num_layers(module)
        rate = float(self.paramwise_cfg['layer_decay_rate'])
        embeddings_weight_decay = bool(self.paramwise_cfg.get('embeddings_weight_decay', True))
        groups: dict[tuple[int, bool], dict] = {}
        for name, param, owner in named_parameters_with_owner(module):
            if not param.requires_grad:
                continue
            layer_id = internvit_layer_id(name, num_layers)
            no_decay = is_no_decay(name, owner, embeddings_weight_decay)
            key = (layer_id, no_decay)
            if key not in groups:
                scale = rate ** (num_layers + 1 - layer_id)
                groups[key] = dict(params=[], param_names=[], lr=self.base_lr * scale, lr_scale=scale,
                                   weight_decay=0.0 if no_decay else float(self.base_wd or 0.0),
                                   layer_id=layer_id)
            groups[key]['params'].append(param)
            groups[key]['param_names'].append(clean_param_name(name))
        if not groups:
            raise ValueError('InternViTLayerDecayOptimizerConstructor: the model has no trainable parameters')
        ordered = [groups[key] for key in sorted(groups)]
        print_log(self.summary(ordered, num_layers, rate), logger='current')
        for group in ordered:
            del group['param_names']  # kept out of the optimizer state dict
        params.extend(ordered)

    @staticmethod
    def summary(groups: List[dict], num_layers: int, rate: float) -> str:
        rows = [f'Layer-wise lr decay: {num_layers} layers, rate {rate}, {len(groups)} parameter groups',
                f'{"layer":>6} {"lr scale":>10} {"lr":>10} {"wd":>6} {"tensors":>8} {"params":>12}  example']
        for g in groups:
            count = sum(getattr(p, 'ds_numel', p.numel()) for p in g['params'])  # ZeRO-3: whole size
            rows.append(f'{g["layer_id"]:>6} {g["lr_scale"]:>10.4g} {g["lr"]:>10.3g} {g["weight_decay"]:>6.3g} '
                        f'{len(g["params"]):>8} {count:>12,}  {g["param_names"][0]}')
        return '\n'.join(rows)
