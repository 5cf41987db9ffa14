"""``ProbeRunner``: MMEngine's ``Runner`` with the held-out split following the sweep switch.

``model.sweep`` is the one switch of a linear probe, and ``--cfg-options model.sweep=True`` is applied after the
config file is read, so the datasets cannot follow it by config variables. ``ProbeRunner`` (the classification
runtime's ``runner_type``) sets ``sweep=model.sweep`` on every ``HeldOutSplit`` of the dataloaders (and of a
``HeadSelectionHook`` given its own loader) before anything is built: the single head trains on the whole
train split, a sweep holds out ``fraction`` of it to choose its head.
"""
from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping

from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .checkpoint import ProbeCheckpointError, read_probe_checkpoint


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
    """``Runner`` whose held-out splits follow ``model.sweep`` (see the module docstring) and whose checkpoint
    loading is strict and names the file (``load_from``, ``tools/test.py``, ``--resume``).

    ``load_from`` / ``tools/test.py`` read the file with the safe reader (tensors and plain data; every other
    pickled object an inert stand-in), so the published InternVL head file loads; ``--resume`` goes through
    MMEngine's loader and the work-dir trust boundary (``mm_adapter.compat``), as its message hub needs."""

    _resuming = False
    loads_checkpoints_strictly = True  # mm_adapter.strict_loading leaves load_checkpoint to this class

    @classmethod
    def from_cfg(cls, cfg) -> 'ProbeRunner':
        cfg = copy.deepcopy(cfg)
        apply_sweep_switch(cfg)
        return super().from_cfg(cfg)

    def resume(self, filename: str, *args, **kwargs) -> None:
        self._resuming = True
        try:
            return super().resume(filename, *args, **kwargs)
        finally:
            self._resuming = False

    def load_checkpoint(self, filename: str, map_location='cpu', strict: bool = False,
                        revise_keys: list = [(r'^module\.', '')]):  # noqa: B006 (MMEngine's signature)
        from mmengine.model import is_model_wrapper
        from mmengine.runner.checkpoint import _load_checkpoint

        if self._resuming or '://' in str(filename):
            checkpoint = _load_checkpoint(filename, map_location=map_location)
        else:
            if not os.path.isfile(filename):
                raise FileNotFoundError(f'checkpoint {filename} does not exist')
            checkpoint = read_probe_checkpoint(filename)
        if not isinstance(checkpoint, Mapping):
            raise ProbeCheckpointError(f'{filename}: holds a {type(checkpoint).__name__}, not a checkpoint')
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        state = checkpoint['state_dict'] if isinstance(checkpoint.get('state_dict'), Mapping) else checkpoint
        for pattern, replacement in revise_keys:
            state = {re.sub(pattern, replacement, k): v for k, v in state.items()}
        try:
            model.load_state_dict(state, strict=True)
        except (ProbeCheckpointError, ValueError, RuntimeError) as err:
            raise type(err)(f'{filename}: {err}') from None
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint
