"""InternViT backbones, torch-only: the model, the architecture presets, the weight layouts and their readers/writers.

Nothing here imports MMEngine, mmseg or mmcv; ``mm_adapter`` registers the model there. Modules, in import order:
``presets`` (architectures as data), ``dtypes``, ``pos_embed``, ``layouts`` (weight name tables, canonical
conversion), ``arch_config`` (architecture from a checkpoint, config.json for an architecture), ``reading`` (safe
reading of files and directories), ``loading`` (strict load), ``internvit`` (the model), ``writing`` (exports),
``atomic`` (atomic writes).
"""
from .internvit import InternViT, count_parameters
from .pos_embed import resample_pos_embed
from .presets import PRESETS, InternViTArch, resolve_arch, vit_forward_flops

__all__ = ['InternViT', 'InternViTArch', 'PRESETS', 'resolve_arch', 'resample_pos_embed', 'vit_forward_flops',
           'count_parameters']
