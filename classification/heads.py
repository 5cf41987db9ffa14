"""Linear-probe heads: feature choices over frozen tokens, a batch norm that syncs across ranks, BN + Linear.

A backbone pass is reduced once per batch to *token summaries* ``[B, L, 2, C]``: for each of the last ``L``
layers the cls token (index 0) and the mean of the patch tokens (index 1). Every feature choice of every head
is a slice of that tensor, so a sweep over feature choices costs one backbone pass, and the feature cache
stores exactly these summaries. The attention-pooling head (feature ``'attention_pooling'``) reads the last layer's
whole token sequence instead, so it shares the backbone pass but cannot train from the summary cache.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

POOLS = ('cls_mean', 'cls', 'mean', 'attention_pooling')


@dataclass(frozen=True)
class FeatureSpec:
    """Which summary a head reads: ``pool`` of each of the last ``layers`` layers, concatenated (oldest first)."""

    pool: str = 'cls_mean'
    layers: int = 1

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f'feature pool must be one of {POOLS}, got {self.pool!r}')
        if self.layers < 1:
            raise ValueError(f'feature layers must be >= 1, got {self.layers}')
        if self.needs_tokens and self.layers != 1:
            raise ValueError('attention pooling reads the last layer only')

    @property
    def needs_tokens(self) -> bool:
        """The head reads the token sequence (attention pooling), not the summaries."""
        return self.pool == 'attention_pooling'

    @classmethod
    def parse(cls, spec: 'str | FeatureSpec') -> 'FeatureSpec':
        """``'cls_mean'`` (published: concat(cls, mean of patches) of the last layer), ``'cls'``, ``'mean'``,
        or any of them with ``_last{n}`` for the last n layers concatenated, e.g. ``'cls_mean_last4'``."""
        if isinstance(spec, FeatureSpec):
            return spec
        if str(spec) == 'attention_pooling':
            return cls('attention_pooling')
        match = re.fullmatch(r'(cls_mean|cls|mean)(?:_last(\d+))?', str(spec))
        if not match:
            raise ValueError(f"unknown feature choice {spec!r}; expected 'cls_mean', 'cls' or 'mean', optionally "
                             f"followed by '_last<n>' (e.g. 'cls_mean_last4'), or 'attention_pooling'")
        return cls(match.group(1), int(match.group(2) or 1))

    @property
    def name(self) -> str:
        return self.pool if self.layers == 1 else f'{self.pool}_last{self.layers}'

    def dim(self, embed_dim: int) -> int:
        return self.layers * embed_dim * (2 if self.pool == 'cls_mean' else 1)

    @property
    def summary_layers(self) -> int:
        """How many last layers' summaries the head reads (0: none, it reads tokens)."""
        return 0 if self.needs_tokens else self.layers

    def select(self, summaries: torch.Tensor) -> torch.Tensor:
        """``[B, L, 2, C]`` summaries (L >= layers) -> ``[B, dim]`` features."""
        if summaries.shape[1] < self.layers:
            raise ValueError(f'feature {self.name!r} needs the last {self.layers} layers, but the summaries hold '
                             f'{summaries.shape[1]}')
        picked = summaries[:, summaries.shape[1] - self.layers:]
        if self.pool == 'cls':
            picked = picked[:, :, :1]
        elif self.pool == 'mean':
            picked = picked[:, :, 1:]
        return picked.flatten(1)


def summarize_tokens(layer_tokens: list[torch.Tensor]) -> torch.Tensor:
    """Token sequences ``[B, 1+N, C]`` (one per layer, oldest first) -> summaries ``[B, L, 2, C]`` in float32."""
    parts = []
    for tokens in layer_tokens:
        tokens = tokens.float()
        parts.append(torch.stack([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1))
    return torch.stack(parts, dim=1)


class ProbeBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch when running under torch.distributed.

    ``nn.SyncBatchNorm`` only runs on GPUs; this one works on any backend (gloo on CPU, NCCL on GPU), so the
    code path tested with two CPU processes is the one used on a cluster. Features from the frozen backbone need no
    gradient, so their statistics are gathered without one (Chan's merge); an input that requires grad (after the
    attention pooling) takes a differentiable all-reduce instead.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not self.training or world == 1:
            return super().forward(x)
        if x.requires_grad:
            return self._forward_with_grad(x)
        with torch.no_grad():
            xf = x.float()
            count = torch.tensor([float(x.shape[0])], device=x.device)
            mean = xf.mean(0)
            m2 = ((xf - mean) ** 2).sum(0)
            # One gather of (count, mean, M2) per rank, merged with Chan's parallel formula (stable for features
            # whose mean is large compared with their spread).
            local = torch.cat([count, mean, m2])
            gathered = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(gathered, local)
            stats = torch.stack(gathered)
            counts, means, m2s = stats[:, :1], stats[:, 1:1 + x.shape[1]], stats[:, 1 + x.shape[1]:]
            total = counts.sum()
            global_mean = (counts * means).sum(0) / total
            global_m2 = (m2s + counts * (means - global_mean) ** 2).sum(0)
            biased_var = global_m2 / total
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                unbiased_var = global_m2 / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(global_mean, alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased_var, alpha=momentum)
        out = (x - global_mean.to(x.dtype)) * torch.rsqrt(biased_var + self.eps).to(x.dtype)
        if self.affine:
            out = out * self.weight + self.bias
        return out

    def _forward_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Global statistics through a differentiable all-reduce (trainable layers before the BN, e.g. the
        attention pooling): the gradient of every rank's statistics reaches every rank, as in SyncBatchNorm."""
        from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

        xf = x.float()
        count = torch.tensor([float(x.shape[0])], device=x.device)
        sums = differentiable_all_reduce(torch.cat([count, xf.sum(0), (xf * xf).sum(0)]))
        total, mean, mean_sq = sums[0], sums[1:1 + x.shape[1]] / sums[0], sums[1 + x.shape[1]:] / sums[0]
        biased_var = (mean_sq - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                unbiased_var = biased_var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased_var, alpha=momentum)
        out = ((xf - mean) * torch.rsqrt(biased_var + self.eps)).to(x.dtype)
        if self.affine:
            out = out * self.weight + self.bias
        return out


class AttentionPooling(nn.Module):
    """One cross-attention layer pooling a token sequence ``[B, T, C]`` into ``[B, C]`` (the published probe's).

    The query is the mean of all tokens (cls included); keys and values are all tokens. q, k and v inputs have
    their own LayerNorm (eps 1e-5); the q/k/v projections have no bias of their own but separate bias vectors
    (``q_bias``, ``k_bias``, ``v_bias``); ``num_heads`` heads; then an output projection C -> C.
    """

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'attention pooling: width {dim} is not divisible by {num_heads} heads')
        self.num_heads = num_heads
        self.norm_q, self.norm_k, self.norm_v = (nn.LayerNorm(dim, eps=eps) for _ in range(3))
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q_bias, self.k_bias, self.v_bias = (nn.Parameter(torch.zeros(dim)) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        return x.view(b, t, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        query = tokens.mean(dim=1, keepdim=True)
        q = self._heads(F.linear(self.norm_q(query), self.q.weight, self.q_bias))
        k = self._heads(F.linear(self.norm_k(tokens), self.k.weight, self.k_bias))
        v = self._heads(F.linear(self.norm_v(tokens), self.v.weight, self.v_bias))
        pooled = F.scaled_dot_product_attention(q, k, v)  # [B, heads, 1, C / heads], scale head_dim ** -0.5
        return self.proj(pooled.transpose(1, 2).flatten(2)).squeeze(1)


class ProbeHead(nn.Module):
    """[attention pooling] -> BatchNorm (affine, eps 1e-6) -> Linear, reading one feature choice; trained at its
    own learning rate. ``norm=False`` leaves out the BatchNorm (the older published head was a plain Linear)."""

    def __init__(self, feature: FeatureSpec, embed_dim: int, num_classes: int, lr: float, norm: bool = True,
                 num_heads: int | None = None):
        super().__init__()
        self.feature = feature
        self.lr = float(lr)
        dim = feature.dim(embed_dim)
        if feature.needs_tokens:
            if num_heads is None:
                raise ValueError('the attention-pooling head needs num_heads (the backbone\'s)')
            self.pool = AttentionPooling(embed_dim, num_heads)
        self.norm = ProbeBatchNorm(dim, eps=1e-6) if norm else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    @property
    def name(self) -> str:
        return f'{self.feature.name}_lr{self.lr:g}'

    def forward(self, summaries: torch.Tensor | None, tokens: torch.Tensor | None = None) -> torch.Tensor:
        if self.feature.needs_tokens:
            if tokens is None:
                raise ValueError('the attention-pooling head reads the token sequence, which the summary feature '
                                 'cache does not hold; train it on images')
            features = self.pool(tokens)
        else:
            features = self.feature.select(summaries)
        return self.fc(self.norm(features))

    def extra_repr(self) -> str:
        return f'feature={self.feature.name}, lr={self.lr:g}'


def head_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-head soft-target cross entropy (timm's ``SoftTargetCrossEntropy`` for each head): ``[H, B, K]`` logits,
    ``[B, K]`` target distributions (mixed and/or smoothed labels) or ``[B]`` labels -> ``[H]``."""
    if targets.dim() == 1:
        targets = F.one_hot(targets, logits.shape[-1]).to(logits.dtype)
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean(-1)
