"""ImageNet accuracy for IN-1K and its variants: top-k, restricted logits for 200-class sets, ReaL labels."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.registry import METRICS


def topk_hits(logits: torch.Tensor, label: int | None, real_labels: Sequence[int] | None,
              class_subset: Sequence[int] | None, topk: Sequence[int]) -> dict[int, np.ndarray] | None:
    """Per-head hits ``{k: bool[H]}`` for one sample's ``[H, K]`` logits, or None when it has no label.

    ``class_subset`` (ImageNet-A/-R): only those classes compete; the prediction is mapped back to its IN-1K
    index. ``real_labels`` (ReaL): a hit is a top-k class inside the label set; an empty set is unlabeled.
    """
    if class_subset is not None:
        subset = torch.as_tensor(class_subset, dtype=torch.long)
        logits = logits[:, subset]
    k_max = min(max(topk), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices  # [H, k]
    if class_subset is not None:
        top = subset[top]
    if real_labels is not None:
        if len(real_labels) == 0:
            return None
        targets = torch.as_tensor(list(real_labels), dtype=torch.long)
        match = (top.unsqueeze(-1) == targets).any(-1)  # [H, k]
    else:
        if label is None or label < 0:
            raise ValueError(f'sample has no label ({label}); is this a ReaL set without real=True?')
        match = top == int(label)
    return {k: match[:, :k].any(1).numpy() for k in topk}


@METRICS.register_module()
class ImageNetAccuracy(BaseMetric):
    """Top-k accuracy (in %) of the predicted head(s).

    Args:
        topk: the k to report (ReaL too: a top-k hit is any of the k classes inside the image's label set).
        real: score against the samples' ReaL label lists; unlabeled images are left out of the mean.
    The 200-class restriction comes from the dataset's ``class_subset`` (see ``ImageNetFolder``).
    Predictions name their heads: the selected head gives ``top1``, ``top5``; its EMA copy ``ema_top1``, ...;
    all heads of a sweep at once (``predict_all_heads``) also ``head<i>_top1``.
    """

    default_prefix = None

    def __init__(self, topk: Sequence[int] = (1, 5), real: bool = False, collect_device: str = 'cpu',
                 prefix: str | None = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.real = real
        self.topk = tuple(int(k) for k in topk)
        self.classes_competing: int | None = None

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        subset = (self.dataset_meta or {}).get('class_subset')
        for sample in data_samples:
            self.classes_competing = len(subset) if subset is not None else sample['logits'].shape[-1]
            if self.real and sample.get('real_labels') is None:
                raise ValueError('ImageNetAccuracy(real=True) needs ReaL labels; use the ImageNetReaL dataset')
            hits = topk_hits(sample['logits'], sample['label'], sample['real_labels'] if self.real else None,
                             subset, self.topk)
            names = sample.get('names') or [''] + [f'head{i}' for i in range(1, sample['logits'].shape[0])]
            self.results.append(None if hits is None else (tuple(names), hits))

    def compute_metrics(self, results: list) -> dict:
        labeled = [r for r in results if r is not None]
        # num_classes: how many classes competed (200 for ImageNet-A/-R), a check that the mask was applied.
        metrics: dict[str, float] = dict(num_scored=float(len(labeled)), num_classes=float(self.classes_competing or 0))
        if not labeled:
            return dict(metrics, **{f'top{k}': float('nan') for k in self.topk})
        names = labeled[0][0]
        for k in self.topk:
            per_head = 100.0 * np.mean(np.stack([hits[k] for _, hits in labeled]), axis=0)
            for name, value in zip(names, per_head):
                metrics[f'{name}_top{k}' if name else f'top{k}'] = float(value)
        return metrics
