"""One optimizer for all heads of a probe, one parameter group (with its own learning rate) per head."""
from __future__ import annotations

import copy
import inspect

from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS, OPTIMIZERS


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LinearProbeOptimWrapperConstructor:
    """Builds ``optim_wrapper.optimizer`` over ``model.heads``: head i's BN and Linear form group i with
    ``lr = head.lr`` (per 512 images; ``auto_scale_lr`` scales every group by the real batch / 512, and the
    schedulers scale each group from its own initial lr). The frozen backbone is never given to the optimizer.

    The learning rates belong to the model (``model.lr`` or ``model.sweep_lrs``), so ``optimizer.lr`` must not
    be set. A plain ``OptimWrapper`` becomes a ``ProbeOptimWrapper`` (gradient clipping per head).
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None):
        if paramwise_cfg:
            raise ValueError('LinearProbeOptimWrapperConstructor takes no paramwise_cfg: every head is its own '
                             'parameter group')
        self.optim_wrapper_cfg = copy.deepcopy(optim_wrapper_cfg)
        self.optimizer_cfg = self.optim_wrapper_cfg.pop('optimizer')
        if 'lr' in self.optimizer_cfg:
            raise ValueError(f"optim_wrapper.optimizer.lr={self.optimizer_cfg['lr']} is not used by a linear probe: "
                             f'set model.lr (one head) or model.sweep.lrs (a sweep), per 512 images')

    def __call__(self, model) -> OptimWrapper:
        model = model.module if is_model_wrapper(model) else model
        groups = [dict(params=list(head.parameters()), lr=head.lr, head=head.name) for head in model.heads]
        cfg = copy.deepcopy(self.optimizer_cfg)
        with OPTIMIZERS.switch_scope_and_registry(None) as registry:
            optimizer_cls = registry.get(cfg['type']) if isinstance(cfg['type'], str) else cfg['type']
        first_arg = next(iter(inspect.signature(optimizer_cls).parameters))
        cfg[first_arg] = groups
        cfg.setdefault('lr', groups[0]['lr'])  # some optimizers require it; every group overrides it
        optimizer = OPTIMIZERS.build(cfg)
        wrapper_cfg = dict(self.optim_wrapper_cfg)
        if wrapper_cfg.get('type', 'OptimWrapper') in ('OptimWrapper', OptimWrapper):
            wrapper_cfg['type'] = 'ProbeOptimWrapper'  # clip_grad per head
        return OPTIM_WRAPPERS.build(wrapper_cfg, default_args=dict(optimizer=optimizer))


@OPTIM_WRAPPERS.register_module()
class ProbeOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose ``clip_grad`` applies to each parameter group (each head) on its own, so every head
    of a sweep is clipped as if it trained alone (the published run clipped its one head at norm 5). Logs the
    largest head norm as ``grad_norm``."""

    def _clip_grad(self) -> None:
        norms = []
        for group in self.optimizer.param_groups:
            params = [p for p in group['params'] if p.grad is not None]
            norm = self.clip_func(params, **self.clip_grad_kwargs) if params else None
            if norm is not None:  # (value clipping returns none)
                norms.append(float(norm))
        if norms:
            self.message_hub.update_scalar('train/grad_norm', max(norms))
