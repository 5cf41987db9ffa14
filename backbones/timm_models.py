"""The InternViT presets in timm's model registry: after ``import backbones``, ``timm.create_model('internvit_6b_224')``
returns this project's ``InternViT`` (the same class configs and the chat model use).

``pretrained=True`` loads the preset's published weights (``backbones.hub.PUBLISHED_HUB_IDS``, through the
Hugging Face cache); ``pretrained='PATH or hub id'`` loads any layout ``backbones.reading`` reads, including timm's
own ``vit_intern300m_patch14_448`` state dict. Other keyword arguments go to ``InternViT`` (``img_size``,
``depth``, ``frozen``, ``dtype``, ``out_indices`` ...). Without timm installed nothing is registered.
"""
from __future__ import annotations

from typing import Callable

from .hub import PUBLISHED_HUB_IDS
from .presets import PRESETS

__all__ = ['register_timm_models']

# What timm.create_model passes to every entrypoint; InternViT has no use for them.
_TIMM_ONLY = ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir')


def _entrypoint(preset: str) -> Callable:
    def create(pretrained=False, **kwargs):
        from .internvit import InternViT
        for name in _TIMM_ONLY:
            kwargs.pop(name, None)
        if kwargs.pop('num_classes', 0):
            raise ValueError(f'{preset}: InternViT has no classifier head (num_classes=0); put a head on '
                             f'forward_features / forward_intermediates instead')
        if pretrained is True:
            if preset not in PUBLISHED_HUB_IDS:
                raise ValueError(f'{preset} has no published weights; pass pretrained=PATH')
            pretrained = PUBLISHED_HUB_IDS[preset]
        return InternViT(preset, pretrained=pretrained or None, **kwargs)

    create.__name__ = create.__qualname__ = preset
    create.__module__ = __name__
    create.__doc__ = f'InternViT preset {preset!r} (backbones.InternViT); pretrained=True: ' \
                     f'{PUBLISHED_HUB_IDS.get(preset, "none published")}'
    return create


def register_timm_models() -> list[str]:
    """Register every preset in timm's model registry (idempotent); returns the names, [] without timm."""
    try:
        from timm.models import is_model, model_entrypoint, register_model
    except ImportError:
        return []
    for preset in PRESETS:
        if is_model(preset) and getattr(model_entrypoint(preset), '__module__', None) == __name__:
            continue
        register_model(_entrypoint(preset))
    return list(PRESETS)
