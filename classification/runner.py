"""``ProbeRunner``: MMEngine's ``Runner`` with the held-out split following the sweep switch.

``model.sweep`` is the one switch of a linear probe, and ``--cfg-options model.sweep=True`` is applied after the
config file is read, so the datasets cannot follow it by config variables. ``ProbeRunner`` (the classification
runtime's ``runner_type``) sets ``sweep=model.sweep`` on every ``HeldOutSplit`` of the dataloaders (and of a
``HeadSelectionHook`` given its own loader) before anything is built: the single head trains on the whole
train split, a sweep holds out ``fraction`` of it to choose its head.
"""
from __future__ import annotations

import copy

from mmengine.registry import RUNNERS
from mmengine.runner import Runner


def _set_sweep(node, sweep: bool) -> int:
    """Set ``sweep`` on every ``HeldOutSplit`` config under ``node``; returns how many were set."""
    count = 0
    if isinstance(node, dict):
        if node.get('type') in ('HeldOutSplit', 'classification.HeldOutSplit'):
            node['sweep'] = sweep
            count += 1
        for value in node.values():
            count += _set_sweep(value, sweep)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += _set_sweep(value, sweep)
    return count


def apply_sweep_switch(cfg) -> int:
    """Tie the config's held-out splits to ``model.sweep`` (in place). Returns the number of splits set."""
    sweep = cfg.get('model', {}).get('sweep', False)
    if not isinstance(sweep, bool):
        return 0  # LinearProbe refuses it with the reason
    count = 0
    for key in list(cfg.keys()):
        if key.endswith('_dataloader'):
            count += _set_sweep(cfg[key], sweep)
    for hook in cfg.get('custom_hooks') or []:
        if isinstance(hook, dict) and hook.get('dataloader') is not None:
            count += _set_sweep(hook['dataloader'], sweep)
    return count


@RUNNERS.register_module()
class ProbeRunner(Runner):
    """``Runner`` whose held-out splits follow ``model.sweep`` (see the module docstring).

    Checkpoints load as in every runner the tools build (``mm_adapter.strict_loading``): strictly, naming the
    file; the published InternVL head file through the converter ``classification`` registers."""

    @classmethod
    def from_cfg(cls, cfg) -> 'ProbeRunner':
        cfg = copy.deepcopy(cfg)
        apply_sweep_switch(cfg)
        return super().from_cfg(cfg)
