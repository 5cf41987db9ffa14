"""Linear-probe heads: feature choices over frozen tokens, a batch norm that syncs across ranks, BN + Linear.

A backbone pass is reduced once per batch to *token summaries* ``[B, L, 2, C]``: for each of the last ``L``
layers the cls token (index 0) and the mean of the patch tokens (index 1). Every feature choice of every head
is a slice of that tensor, so a sweep over feature choices costs one backbone pass, and the feature cache
stores exactly these summaries.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

POOLS = ('cls_mean', 'cls', 'mean')


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

    @classmethod
    def parse(cls, spec: 'str | FeatureSpec') -> 'FeatureSpec':
        """``'cls_mean'`` (published: concat(cls, mean of patches) of the last layer), ``'cls'``, ``'mean'``,
        or any of them with ``_last{n}`` for the last n layers concatenated, e.g. ``'cls_mean_last4'``."""
        if isinstance(spec, FeatureSpec):
            return spec
        match = re.fullmatch(r'(cls_mean|cls|mean)(?:_last(\d+))?', str(spec))
        if not match:
            raise ValueError(f"unknown feature choice {spec!r}; expected 'cls_mean', 'cls' or 'mean', optionally "
                             f"followed by '_last<n>' (e.g. 'cls_mean_last4')")
        return cls(match.group(1), int(match.group(2) or 1))

    @property
    def name(self) -> str:
        return self.pool if self.layers == 1 else f'{self.pool}_last{self.layers}'

    def dim(self, embed_dim: int) -> int:
        return self.layers * embed_dim * (2 if self.pool == 'cls_mean' else 1)

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
    code path tested with two CPU processes is the one used on a cluster. The statistics are gathered without
    gradient: a linear probe's features come from a frozen backbone, so nothing upstream needs one (an input that
    requires grad under DDP is refused rather than silently given a wrong gradient).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not self.training or world == 1:
            return super().forward(x)
        if x.requires_grad:
            raise RuntimeError('ProbeBatchNorm synchronizes statistics without gradient; it expects features from '
                               'a frozen backbone, but its input requires grad')
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


class ProbeHead(nn.Module):
    """BatchNorm (affine, eps 1e-6) then Linear, reading one feature choice; trained at its own learning rate."""

    def __init__(self, feature: FeatureSpec, embed_dim: int, num_classes: int, lr: float):
        super().__init__()
        self.feature = feature
        self.lr = float(lr)
        dim = feature.dim(embed_dim)
        self.norm = ProbeBatchNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    @property
    def name(self) -> str:
        return f'{self.feature.name}_lr{self.lr:g}'

    def forward(self, summaries: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.feature.select(summaries)))

    def extra_repr(self) -> str:
        return f'feature={self.feature.name}, lr={self.lr:g}'


def head_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-head cross entropy: ``[H, B, K]`` logits, ``[B]`` labels -> ``[H]``."""
    h, b, k = logits.shape
    per_sample = F.cross_entropy(logits.reshape(h * b, k), labels.repeat(h), reduction='none')
    return per_sample.view(h, b).mean(1)
