"""The published probe's learning-rate schedule as an MMEngine scheduler: timm's ``CosineLRScheduler`` per iteration.

The published trainer builds ``CosineLRScheduler(t_initial=epochs * iters, warmup_t=warmup_epochs * iters,
warmup_lr_init=0, lr_min=0, cycle_limit=1, t_in_epochs=False)`` and calls ``step_update(global_iter)`` after each
optimizer step. So iteration 0 runs at ``warmup_lr_init`` and iteration g >= 1 at timm's value for t = g - 1: a
linear warm-up from 0 over the first epoch, then cosine over *all* iterations (the curve starts from t = 0, so the
first post-warm-up value is already below the peak, 0.1951 rather than 0.2 at lr 0.2 and 1 of 10 epochs).
"""
from __future__ import annotations

import math

from mmengine.optim.scheduler.lr_scheduler import LRSchedulerMixin
from mmengine.optim.scheduler.param_scheduler import INF, _ParamScheduler
from mmengine.registry import PARAM_SCHEDULERS

from mm_adapter.schedule_resume import ConfigShapedResumeMixin


def timm_cosine_value(t: int, base: float, t_initial: int, warmup_t: int, warmup_lr_init: float = 0.0,
                      lr_min: float = 0.0) -> float:
    """timm ``CosineLRScheduler._get_lr`` for one group (one cycle, no decay, no noise, no warm-up prefix)."""
    if t < warmup_t:
        return warmup_lr_init + t * (base - warmup_lr_init) / warmup_t
    if t >= t_initial:  # after the single cycle
        return lr_min
    return lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * t / t_initial))


class TimmCosineParamScheduler(ConfigShapedResumeMixin, _ParamScheduler):
    """Per-iteration cosine with linear warm-up, as the published trainer drove timm's ``CosineLRScheduler``.

    Args:
        t_initial / warmup_t: total and warm-up length, in epochs when ``by_epoch=True`` (converted to iterations
            with ``convert_to_iter_based=True``, the intended use), else in iterations.
        warmup_lr_init / lr_min: absolute learning rates (0 in the published recipe).
    Every parameter group follows from its own initial lr (the sweep's heads each have theirs). On resume the
    config owns the curve and the checkpoint the position (``mm_adapter.schedule_resume``), like timm's scheduler,
    whose value is a function of the global iteration.
    """

    def __init__(self, optimizer, param_name: str, t_initial: float, warmup_t: float = 0,
                 warmup_lr_init: float = 0.0, lr_min: float = 0.0, begin: int = 0, end: int = INF,
                 last_step: int = -1, by_epoch: bool = True, verbose: bool = False):
        self.t_initial, self.warmup_t = int(t_initial), int(warmup_t)
        if self.t_initial <= 0 or not 0 <= self.warmup_t < self.t_initial:
            raise ValueError(f'TimmCosineLR needs t_initial > 0 and 0 <= warmup_t < t_initial, got '
                             f't_initial={t_initial}, warmup_t={warmup_t}')
        self.warmup_lr_init, self.lr_min = float(warmup_lr_init), float(lr_min)
        super().__init__(optimizer, param_name=param_name, begin=begin, end=end, last_step=last_step, by_epoch=by_epoch,
                         verbose=verbose)

    @classmethod
    def build_iter_from_epoch(cls, *args, t_initial, warmup_t=0, begin=0, end=INF, by_epoch=True,
                              epoch_length=None, **kwargs):
        if not by_epoch or not epoch_length:
            raise ValueError('TimmCosineLR: convert_to_iter_based needs by_epoch=True and a known epoch length')
        return cls(*args, t_initial=t_initial * epoch_length, warmup_t=warmup_t * epoch_length,
                   begin=int(begin * epoch_length), end=end if end == INF else int(end * epoch_length),
                   by_epoch=False, **kwargs)

    def _get_value(self):
        # last_step s is the iteration about to run; the published loop ran it at timm's value for t = s - 1.
        step = self.last_step - self.begin
        if step <= 0:
            return [self.warmup_lr_init if self.warmup_t else base for base in self.base_values]
        return [timm_cosine_value(step - 1, base, self.t_initial, self.warmup_t, self.warmup_lr_init, self.lr_min)
                for base in self.base_values]


@PARAM_SCHEDULERS.register_module()
class TimmCosineLR(LRSchedulerMixin, TimmCosineParamScheduler):
    """``TimmCosineParamScheduler`` of the learning rate (see there)."""
