"""InternViT architectures as data: the shape-defining hyperparameters and the published presets."""
from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ['InternViTArch', 'PRESETS', 'resolve_arch', 'vit_forward_flops']


@dataclass(frozen=True)
class InternViTArch:
    """Shape-defining hyperparameters of an InternViT (everything a checkpoint must agree with)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int = 14
    img_size: int = 224  # the grid the stored position embedding is for
    in_chans: int = 3
    qkv_bias: bool = False
    norm_type: str = 'rms_norm'  # 'rms_norm' | 'layer_norm'
    norm_eps: float = 1e-6
    qk_norm: bool = True  # RMSNorm over the full width of q and k, before splitting heads
    layer_scale_init: float = 0.1

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f'embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}')
        if self.norm_type not in ('rms_norm', 'layer_norm'):
            raise ValueError(f"norm_type must be 'rms_norm' or 'layer_norm', got {self.norm_type!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f'img_size {self.img_size} is not a multiple of patch_size {self.patch_size}')

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


PRESETS: dict[str, InternViTArch] = {
    'internvit_6b_224': InternViTArch(embed_dim=3200, depth=48, num_heads=25, mlp_dim=12800, img_size=224),
    # V1-2 / V1-5 448px: the same network with the last three blocks removed.
    'internvit_6b_448': InternViTArch(embed_dim=3200, depth=45, num_heads=25, mlp_dim=12800, img_size=448),
    'internvit_300m_448': InternViTArch(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096, img_size=448,
                                        qkv_bias=True, norm_type='layer_norm', qk_norm=False),
    # Small sizes for tests and the CPU quick start.
    'internvit_tiny': InternViTArch(embed_dim=64, depth=4, num_heads=4, mlp_dim=256, img_size=56),
    'internvit_tiny_ln': InternViTArch(embed_dim=64, depth=4, num_heads=4, mlp_dim=256, img_size=56,
                                       qkv_bias=True, norm_type='layer_norm', qk_norm=False),
}


def resolve_arch(preset: str | InternViTArch | None = None, **overrides) -> InternViTArch:
    """A preset by name (or an arch) with any field overridden; no preset means every shape field is given."""
    if isinstance(preset, InternViTArch):
        base = preset
    elif preset is None:
        base = None
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise KeyError(f'unknown InternViT preset {preset!r}; known presets: {", ".join(PRESETS)}')
    unknown = sorted(set(overrides) - set(InternViTArch.__dataclass_fields__))
    if unknown:
        raise TypeError(f'unknown InternViT argument(s) {", ".join(unknown)}; shape fields are '
                        f'{", ".join(InternViTArch.__dataclass_fields__)}')
    if base is None:
        missing = [f for f in ('embed_dim', 'depth', 'num_heads', 'mlp_dim') if f not in overrides]
        if missing:
            raise TypeError(f'InternViT without a preset needs {", ".join(missing)} (or preset=one of '
                            f'{", ".join(PRESETS)})')
        return InternViTArch(**overrides)
    return replace(base, **overrides) if overrides else base


def vit_forward_flops(arch: InternViTArch, height: int, width: int, depth: int | None = None) -> float:
    """FLOPs of one image's forward pass: layers x (2N(4C^2 + 2C*MLP) + 4N^2 C), N tokens with cls."""
    n = 1 + (height // arch.patch_size) * (width // arch.patch_size)
    c, m = arch.embed_dim, arch.mlp_dim
    layers = arch.depth if depth is None else depth
    return float(layers * (2 * n * (4 * c * c + 2 * c * m) + 4 * n * n * c))
