"""mmcv 1.x's ``poly`` lr policy with linear warm-up, as the published segmentation recipes ran it.

mmcv computes the poly value from iteration 0 and multiplies the warm-up factor on top of it:

    lr(t) = ((base - min_lr) * (1 - t / max_iters) ** power + min_lr) * w(t),
    w(t)  = 1 - (1 - t / warmup_iters) * (1 - warmup_ratio)   for t < warmup_iters, else 1.

MMEngine's ``LinearLR`` followed by a ``PolyLR`` that begins after the warm-up is another curve (poly restarts at
the end of warm-up), and chaining the two from iteration 0 leaves the last warm-up factor on every later value.
This scheduler evaluates the closed form instead (per parameter group, from its initial lr).
"""
from __future__ import annotations

from mmengine.optim.scheduler.lr_scheduler import LRSchedulerMixin
from mmengine.optim.scheduler.param_scheduler import INF, _ParamScheduler

from mm_adapter.schedule_resume import ConfigShapedResumeMixin

from ._registry import register_everywhere


def mmcv_poly_warmup_factor(t: int, max_iters: int, power: float = 1.0, warmup_iters: int = 0,
                            warmup_ratio: float = 1e-6) -> float:
    """lr(t) / base for ``min_lr = 0`` (the published recipes)."""
    factor = (1 - t / max_iters) ** power
    if t < warmup_iters:
        factor *= 1 - (1 - t / warmup_iters) * (1 - warmup_ratio)
    return factor


@register_everywhere('PARAM_SCHEDULERS')
class PolyLRWithLinearWarmup(LRSchedulerMixin, ConfigShapedResumeMixin, _ParamScheduler):
    """mmcv 1.x ``lr_config=dict(policy='poly', warmup='linear', ...)`` (see the module docstring).

    Args:
        optimizer: the wrapped optimizer.
        power, eta_min: poly power and final lr (mmcv's ``min_lr``).
        warmup_iters, warmup_ratio: linear warm-up length and starting factor (mmcv's names).
        end: the last iteration, ``max_iters`` (poly reaches ``eta_min`` there).
    """

    def __init__(self, optimizer, power: float = 1.0, eta_min: float = 0.0, warmup_iters: int = 0,
                 warmup_ratio: float = 1e-6, begin: int = 0, end: int = INF, last_step: int = -1,
                 by_epoch: bool = False, verbose: bool = False):
        if end == INF:
            raise ValueError('PolyLRWithLinearWarmup needs end= the number of training iterations')
        if warmup_iters < 0 or not 0 < warmup_ratio <= 1:
            raise ValueError(f'warmup_iters must be >= 0 and warmup_ratio in (0, 1], got {warmup_iters}, '
                             f'{warmup_ratio}')
        self.power, self.eta_min = power, eta_min
        self.warmup_iters, self.warmup_ratio = warmup_iters, warmup_ratio
        super().__init__(optimizer, begin=begin, end=end, last_step=last_step, by_epoch=by_epoch, verbose=verbose)

    def _get_value(self):
        t, total = self.last_step, self.end - self.begin
        poly = (1 - t / total) ** self.power
        warm = 1 - (1 - t / self.warmup_iters) * (1 - self.warmup_ratio) if t < self.warmup_iters else 1.0
        return [((base - self.eta_min) * poly + self.eta_min) * warm for base in self.base_values]
