"""InternViT: the vision transformer of InternVL (6B and 300M), one implementation for every package.

Parameter names follow the Hugging Face ``InternVisionModel`` layout exactly (``embeddings.*``,
``encoder.layers.{i}.*``), so that layout is this model's own state dict and every other layout converts to it
(see ``backbones/layouts.py``).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, replace
from functools import partial
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from timm.layers import DropPath  # stochastic depth per sample, scaled by 1/keep
from torch import nn
from torch.utils.checkpoint import checkpoint

from .arch_config import arch_for_weights
from .deferred_load import defer, loading_is_deferred
from .dtypes import as_dtype
from .layouts import Weights
from .loading import build_and_load, load_into_model
from .pos_embed import resample_pos_embed
from .presets import InternViTArch, resolve_arch
from .reading import read_weights

logger = logging.getLogger(__name__)

ATTN_IMPLS = ('sdpa', 'eager', 'flash_attn')

# Input normalization of every published InternViT (RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RMSNorm(nn.Module):
    """RMSNorm with a weight only; statistics in float32 as in the published model."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


NORM_TYPES = {'rms_norm': RMSNorm, 'layer_norm': nn.LayerNorm}


def build_norm(arch: InternViTArch, dim: int) -> nn.Module:
    return NORM_TYPES[arch.norm_type](dim, eps=arch.norm_eps)


class Embeddings(nn.Module):
    def __init__(self, arch: InternViTArch):
        super().__init__()
        self.patch_size = arch.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, arch.embed_dim))
        self.patch_embedding = nn.Conv2d(arch.in_chans, arch.embed_dim, arch.patch_size, arch.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + arch.grid_size ** 2, arch.embed_dim))
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def reset_parameters(self) -> None:
        """The constructor's values of this module's own parameters (``InternViT`` then draws them)."""
        nn.init.zeros_(self.class_embedding)
        nn.init.zeros_(self.position_embedding)

    def position_embedding_for(self, grid_hw: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """Position embeddings for a grid, cached per grid for a frozen embedding (``requires_grad=False``).

        A trainable embedding is resampled at every call: its graph must be rebuilt each step, and FSDP/ZeRO-3
        swap gathered storage in and out of parameters in ways a cache key cannot see. The key still holds the
        storage and version counter, so even an in-place edit of a frozen embedding is noticed.
        """
        pos = self.position_embedding
        if pos.requires_grad or torch.compiler.is_compiling() or pos.is_meta:
            return resample_pos_embed(pos, grid_hw).to(dtype)
        key = (grid_hw, dtype, pos.device, pos.data_ptr(), pos._version)
        cached = self._pos_cache.get(key)
        if cached is None:
            if len(self._pos_cache) > 16:
                self._pos_cache.clear()
            cached = self._pos_cache[key] = resample_pos_embed(pos.detach(), grid_hw).to(dtype)
        return cached

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _, _, height, width = pixel_values.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f'InternViT needs input height and width that are multiples of the patch size {p}; '
                             f'got {height}x{width}. Resize or pad the image, e.g. to '
                             f'{math.ceil(height / p) * p}x{math.ceil(width / p) * p}.')
        x = self.patch_embedding(pixel_values)  # [B, C, h, w]
        grid_hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return x + self.position_embedding_for(grid_hw, x.dtype)


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # optional dependency, GPU only
    except ImportError as err:
        raise ImportError("attn_impl='flash_attn' needs the flash-attn package (pip install -e '.[gpu]' on a CUDA "
                          "machine); attn_impl='sdpa' uses PyTorch's fused kernels without it") from err
    return flash_attn_func


class Attention(nn.Module):
    def __init__(self, arch: InternViTArch, attn_impl: str = 'sdpa'):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}')
        dim = arch.embed_dim
        self.num_heads = arch.num_heads
        self.head_dim = dim // arch.num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_impl = attn_impl
        if attn_impl == 'flash_attn':
            _flash_attn_func()  # fail at construction, not at the first forward
        self.qkv = nn.Linear(dim, 3 * dim, bias=arch.qkv_bias)
        self.qk_norm = arch.qk_norm
        if arch.qk_norm:
            self.q_norm = RMSNorm(dim, eps=arch.norm_eps)
            self.k_norm = RMSNorm(dim, eps=arch.norm_eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each [B, N, C]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        heads = (b, n, self.num_heads, self.head_dim)
        if self.attn_impl == 'flash_attn':
            out = _flash_attn_func()(q.view(heads), k.view(heads), v.view(heads), softmax_scale=self.scale)
            return self.proj(out.reshape(b, n, c))
        q, k, v = (t.view(heads).transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
        if self.attn_impl == 'sdpa':
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:  # eager: the reference the benchmarks compare against
            attn = (q * self.scale) @ k.transpose(-2, -1)
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, arch: InternViTArch):
        super().__init__()
        self.fc1 = nn.Linear(arch.embed_dim, arch.mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(arch.mlp_dim, arch.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, arch: InternViTArch, drop_path: float = 0.0, attn_impl: str = 'sdpa'):
        super().__init__()
        self.norm1 = build_norm(arch, arch.embed_dim)
        self.attn = Attention(arch, attn_impl)
        self.ls1 = nn.Parameter(torch.full((arch.embed_dim,), float(arch.layer_scale_init)))
        self.norm2 = build_norm(arch, arch.embed_dim)
        self.mlp = MLP(arch)
        self.ls2 = nn.Parameter(torch.full((arch.embed_dim,), float(arch.layer_scale_init)))
        self.drop_path = DropPath(drop_path)
        self.layer_scale_init = float(arch.layer_scale_init)

    def reset_parameters(self) -> None:
        """The constructor's values of this module's own parameters (the layer scales; children reset themselves)."""
        nn.init.constant_(self.ls1, self.layer_scale_init)
        nn.init.constant_(self.ls2, self.layer_scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)) * self.ls1)
        return x + self.drop_path(self.mlp(self.norm2(x)) * self.ls2)


class Encoder(nn.Module):
    def __init__(self, arch: InternViTArch, drop_path_rate: float = 0.0, attn_impl: str = 'sdpa'):
        super().__init__()
        # Stochastic depth rises linearly from 0 at the first block to drop_path_rate at the last.
        rates = torch.linspace(0, drop_path_rate, arch.depth, device='cpu').tolist()
        self.layers = nn.ModuleList(Block(arch, rate, attn_impl) for rate in rates)


class InternViT(nn.Module):
    """InternViT backbone.

    Args:
        preset: a name from ``PRESETS`` (``internvit_6b_224``, ``internvit_6b_448``, ``internvit_300m_448``, ...)
            or None to give every shape field (``embed_dim``, ``depth``, ``num_heads``, ``mlp_dim``) yourself.
        arch_overrides: any ``InternViTArch`` field, e.g. ``depth=45`` or ``img_size=448``.
        pretrained: a checkpoint path in any layout ``backbones.reading.read_weights`` reads (or its ``Weights``);
            loaded at construction
            (except on the meta device). A file that loads nothing into the model is an error.
        out_indices: layers whose outputs ``forward`` returns (negative counts from the end); None returns
            ``forward_features`` (the final tokens).
        output_format: ``'nchw'`` (feature maps, for dense heads) or ``'tokens'``.
        with_cls: for ``'tokens'``, keep the cls token; for ``'nchw'``, return ``(map, cls)`` pairs.
        frozen: no gradients, eval mode even under ``train()``, forward under ``no_grad``.
        dtype: run the backbone in this dtype (e.g. ``'bfloat16'``); outputs come back in the input's dtype so
            the caller's heads stay in fp32.
        attn_impl: ``'sdpa'`` (default), ``'eager'`` or ``'flash_attn'`` (optional package, GPU).
        grad_checkpointing: recompute each block in backward (activation checkpointing).
        compile: ``torch.compile`` each block (regional compilation: all blocks share one compiled graph, so compile
            time does not grow with depth; ``fullgraph`` except with flash-attn, an opaque extension call). The
            parameter names stay as they are.
    """

    def __init__(self, preset: str | InternViTArch | None = None, *, pretrained: str | Weights | None = None,
                 out_indices: Iterable[int] | None = None, output_format: str = 'nchw', with_cls: bool = False,
                 frozen: bool = False, dtype: str | torch.dtype | None = None, attn_impl: str = 'sdpa',
                 drop_path_rate: float = 0.0, grad_checkpointing: bool = False, compile: bool = False,
                 init_cfg=None, **arch_overrides):
        super().__init__()
        self.arch = resolve_arch(preset, **arch_overrides)
        if output_format not in ('nchw', 'tokens'):
            raise ValueError(f"output_format must be 'nchw' or 'tokens', got {output_format!r}")
        self.out_indices = None if out_indices is None else self._normalize_indices(out_indices)
        self.output_format = output_format
        self.with_cls = with_cls
        self.frozen = frozen
        self.compute_dtype = as_dtype(dtype)
        self.grad_checkpointing = grad_checkpointing
        self.drop_path_rate = drop_path_rate
        self.pretrained = pretrained.source if isinstance(pretrained, Weights) else pretrained

        if init_cfg is not None:
            # MMEngine would apply it after construction, possibly over loaded weights, or ignore a bad path.
            raise ValueError(f'InternViT does not take init_cfg (got {init_cfg!r}): give checkpoints as '
                             f'pretrained=PATH, which is loaded and checked at construction')

        target = torch.get_default_device()
        if target.type != 'meta' and loading_is_deferred():
            # A sharded start-up (segmentation.sharded_startup: FSDP, DeepSpeed ZeRO-3) writes each rank's shard
            # from the file, or from the random initialisation drawn here as an eager build draws it: the backbone
            # stays on meta until then (backbones.deferred_load).
            with torch.device('meta'):
                self._build_modules(drop_path_rate, attn_impl)
            defer(self, pretrained, self._init_steps())
        elif pretrained is not None and target.type != 'meta':
            # Built without initializing (a 6B model's random init takes minutes and the strict load overwrites
            # every tensor); each tensor is then allocated once, in the compute dtype, from the checkpoint.
            weights = pretrained if isinstance(pretrained, Weights) else read_weights(pretrained)
            build_and_load(lambda: self._build_modules(drop_path_rate, attn_impl), weights.state_dict,
                           source=weights.source, dtype=self.compute_dtype, device=target)
            logger.info(f'InternViT: loaded {len(weights.state_dict)} tensors from {weights.source} '
                        f'({weights.layout} layout)')
        else:
            self._build_modules(drop_path_rate, attn_impl)
            self._init_parameters()
            if pretrained is not None:
                logger.info(f'InternViT built on the meta device: {self.pretrained} is not loaded')
        self._apply_dtype_and_freeze()
        self.compiled = bool(compile)
        if compile:
            self.compile_blocks(fullgraph=attn_impl != 'flash_attn')

    # ----------------------------------------------------------------------------------------------- set-up
    def _build_modules(self, drop_path_rate: float, attn_impl: str) -> 'InternViT':
        self.embeddings = Embeddings(self.arch)
        self.encoder = Encoder(self.arch, drop_path_rate, attn_impl)
        return self

    @property
    def depth(self) -> int:
        return len(self.encoder.layers)

    @property
    def embed_dim(self) -> int:
        return self.arch.embed_dim

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    def _normalize_indices(self, indices: Iterable[int]) -> list[int]:
        out = []
        for i in indices:
            j = i + self.arch.depth if i < 0 else i
            if not 0 <= j < self.arch.depth:
                raise IndexError(f'layer index {i} is out of range for a {self.arch.depth}-layer InternViT')
            out.append(j)
        return out

    def _init_steps(self) -> Iterator[tuple[str, Callable[[torch.Tensor], object]]]:
        """The random initialisation after construction, in order: (parameter name, in-place initialiser)."""
        trunc_normal = partial(nn.init.trunc_normal_, std=0.02)
        yield 'embeddings.position_embedding', trunc_normal
        yield 'embeddings.class_embedding', trunc_normal
        for name, module in self.encoder.named_modules(prefix='encoder'):
            if isinstance(module, nn.Linear):
                yield f'{name}.weight', trunc_normal
                if module.bias is not None:
                    yield f'{name}.bias', nn.init.zeros_

    def _init_parameters(self):
        if self.embeddings.position_embedding.is_meta:
            return
        parameters = dict(self.named_parameters())
        for name, initialise in self._init_steps():
            initialise(parameters[name])

    def _apply_dtype_and_freeze(self):
        if self.compute_dtype is not None:
            self.to(self.compute_dtype)
        if self.frozen:
            self.requires_grad_(False)
            self.train(False)

    def compile_blocks(self, **compile_kwargs) -> None:
        """``torch.compile`` every block in place (``nn.Module.compile``: the module and its names are kept)."""
        for block in self.encoder.layers:
            block.compile(**compile_kwargs)

    def init_weights(self):
        """Nothing to do: weights (pretrained or random) are set at construction. Frameworks that call
        ``init_weights()`` on every submodule after building (MMEngine's runner) must not redo them."""

    def train(self, mode: bool = True):
        return super().train(False if self.frozen else mode)

    def load_pretrained(self, path: str, strict: bool = True) -> None:
        """Load a checkpoint in any supported layout, resampling position embeddings to this model's grid.

        ``strict``: every tensor of the model must be in the checkpoint, and nothing else (see
        ``backbones.loading.load_into_model``)."""
        weights = read_weights(path)
        load_into_model(self, weights.state_dict, source=str(path), strict=strict)
        logger.info(f'InternViT: loaded {len(weights.state_dict)} tensors from {path} ({weights.layout} layout)')

    @classmethod
    def from_pretrained(cls, path: str, *, device: torch.device | str | None = None, **kwargs) -> 'InternViT':
        """Build the model a checkpoint describes (its HF config.json where there is one) and load its weights.

        No random initialisation: the model is built on the meta device and each tensor is placed once, in
        ``dtype`` on ``device`` (default: the current default device). Other keyword arguments go to the
        constructor (``frozen``, ``dtype``, ``out_indices``, ``img_size`` ...).
        """
        weights = read_weights(path)
        arch_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in InternViTArch.__dataclass_fields__}
        arch = arch_for_weights(weights, num_heads=arch_fields.pop('num_heads', None))
        arch = replace(arch, **arch_fields) if arch_fields else arch
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return cls(arch, pretrained=weights, **kwargs)

    def arch_dict(self) -> dict:
        return asdict(self.arch)

    # ----------------------------------------------------------------------------------------------- forward
    def _context(self):
        return torch.no_grad() if self.frozen else contextlib.nullcontext()

    def _run_block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        return self.embeddings(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final token sequence ``[B, 1+N, C]``, cls first (the HF model's ``last_hidden_state``)."""
        out_dtype = x.dtype
        with self._context():
            tokens = self._embed(x)
            for block in self.encoder.layers:
                tokens = self._run_block(block, tokens)
        return tokens.to(out_dtype)

    _TIMM_FORMATS = {'NCHW': 'nchw', 'NLC': 'tokens'}

    def forward_intermediates(self, x: torch.Tensor, indices: Iterable[int] | int | None = None,
                              output_format: str = 'tokens', with_cls: bool | None = None, *,
                              output_fmt: str | None = None) -> list:
        """Outputs of the given layers (0-based, negative from the end), in the order asked.

        ``indices``: layer indices, an int n for the last n layers, or None for all (as timm). ``'tokens'``:
        ``[B, 1+N, C]`` (``[B, N, C]`` without cls). ``'nchw'``: ``[B, C, h, w]`` maps, or ``(map, cls [B, C])``
        pairs with ``with_cls``. ``with_cls`` defaults to True for tokens, False for maps. timm's keyword
        ``output_fmt`` ('NCHW' / 'NLC') is accepted too. Blocks after the deepest requested layer are not run.
        """
        if output_fmt is not None:
            output_format = self._TIMM_FORMATS.get(output_fmt, output_fmt)
        if with_cls is None:
            with_cls = output_format == 'tokens'
        if indices is None or isinstance(indices, int):
            count = self.depth if indices is None else indices
            indices = list(range(self.depth - count, self.depth))
        if output_format not in ('nchw', 'tokens'):
            raise ValueError(f"output_format must be 'nchw' or 'tokens' (timm: 'NCHW', 'NLC'), got {output_format!r}")
        wanted = self._normalize_indices(indices)
        out_dtype = x.dtype
        grid_hw = (x.shape[-2] // self.arch.patch_size, x.shape[-1] // self.arch.patch_size)
        found: dict[int, torch.Tensor] = {}
        with self._context():
            tokens = self._embed(x)
            for i, block in enumerate(self.encoder.layers[:max(wanted) + 1]):
                tokens = self._run_block(block, tokens)
                if i in wanted:
                    found[i] = tokens
        return [self._format(found[i].to(out_dtype), grid_hw, output_format, with_cls) for i in wanted]

    @staticmethod
    def _format(tokens: torch.Tensor, grid_hw, output_format: str, with_cls: bool):
        if output_format == 'tokens':
            return tokens if with_cls else tokens[:, 1:]
        b, _, c = tokens.shape
        fmap = tokens[:, 1:].transpose(1, 2).reshape(b, c, *grid_hw)
        return (fmap, tokens[:, 0]) if with_cls else fmap

    def forward(self, x: torch.Tensor):
        """Backbone output for MMEngine/mmseg: a tuple over ``out_indices``, or the final tokens if None."""
        if self.out_indices is None:
            return self.forward_features(x)
        return tuple(self.forward_intermediates(x, self.out_indices, self.output_format, self.with_cls))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
