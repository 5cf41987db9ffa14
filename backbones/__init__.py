"""InternViT backbones: the model, its weight layouts, and its registration in MMEngine's registries."""
from .compat import ensure_mmcv_ops

ensure_mmcv_ops()  # before anything imports mmseg: mmcv-lite has no compiled ops

from .internvit import InternViT, count_parameters  # noqa: E402
from .pos_embed import resample_pos_embed  # noqa: E402
from .presets import PRESETS, InternViTArch, resolve_arch, vit_forward_flops  # noqa: E402


def _register() -> None:
    # Registered in the root registry and mmseg's, so configs may say type='InternViT' with or without scope.
    from mmengine.registry import MODELS as ROOT_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS
    for registry in (ROOT_MODELS, MMSEG_MODELS):
        registry.register_module(name='InternViT', module=InternViT, force=True)


_register()

from .timm_models import register_timm_models  # noqa: E402

register_timm_models()  # timm.create_model('internvit_6b_224') etc.

__all__ = ['InternViT', 'InternViTArch', 'PRESETS', 'resolve_arch', 'resample_pos_embed', 'vit_forward_flops',
           'count_parameters']
