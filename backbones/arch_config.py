"""The architecture of a checkpoint (from its tensors and its HF or native config.json), and config.json for an arch."""
from __future__ import annotations

import math
from collections import Counter
from typing import Mapping

import torch

from .layouts import PATCH_KEY, POS_KEY, Weights, WeightsError, _layer_indices
from .presets import InternViTArch

__all__ = ['arch_for_weights', 'vision_config_of', 'hf_config_from_arch', 'native_config_from_arch']

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
    # The width most layers have: a single wrong tensor (even in layer 0) is then the one reported as mismatched.
    mlp_widths = Counter(int(sd[f'encoder.layers.{i}.mlp.fc1.weight'].shape[0]) for i in layers
                         if f'encoder.layers.{i}.mlp.fc1.weight' in sd)
    if mlp_widths:
        fields['mlp_dim'] = mlp_widths.most_common(1)[0][0]
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


def _image_size(arch: InternViTArch, image_size: int | None) -> int:
    """``image_size`` (default: the architecture's), which must be a multiple of the patch size."""
    image_size = int(image_size or arch.img_size)
    if image_size % arch.patch_size:
        raise ValueError(f'image_size {image_size} is not a multiple of patch_size {arch.patch_size}')
    return image_size


def hf_config_from_arch(arch: InternViTArch, image_size: int | None = None) -> dict:
    """config.json of a published-style HF ``InternVisionModel`` (``InternVisionConfig`` fields)."""
    image_size = _image_size(arch, image_size)
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
    image_size = _image_size(arch, image_size)
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
