"""InternViT backbones, torch-only: the model, the architecture presets, the weight layouts and their readers/writers.

Nothing here imports MMEngine, mmseg or mmcv; ``mm_adapter`` registers the model there. Modules, in import order:
``presets`` (architectures as data), ``dtypes``, ``pos_embed``, ``layouts`` (weight name tables, canonical
conversion), ``arch_config`` (architecture from a checkpoint, config.json for an architecture), ``reading`` (safe
reading of files and directories), ``loading`` (strict load), ``internvit`` (the model), ``writing`` (exports),
``atomic`` (atomic writes), ``hub`` (hub ids -> cached snapshots), ``run_config`` (the backbone of a run's stored
config text), ``timm_models`` (the presets in timm's registry, registered on import when timm is installed).
"""
from .internvit import InternViT, count_parameters
from .pos_embed import resample_pos_embed
from .presets import PRESETS, InternViTArch, resolve_arch, vit_forward_flops
from .timm_models import register_timm_models

register_timm_models()  # timm.create_model('internvit_6b_224') etc.

__all__ = ['InternViT', 'InternViTArch', 'PRESETS', 'resolve_arch', 'resample_pos_embed', 'vit_forward_flops',
           'count_parameters']
