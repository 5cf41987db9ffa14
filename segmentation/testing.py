"""Small helpers shared by the segmentation tests and the benchmark: tiny datasets and tiny-run config overrides."""
from __future__ import annotations

import os.path as osp
from typing import Any, Dict, List

QUICKSTART_CONFIG = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs', 'segmentation',
                             'quickstart_tiny_upernet_synthetic.py')


def make_tiny_dataset(root: str, num_train: int = 8, num_val: int = 4, size: int = 112, seed: int = 0) -> str:
    from .synthetic import write_synthetic_ade20k
    return write_synthetic_ade20k(root, num_train=num_train, num_val=num_val, size=size, seed=seed)


def tiny_run_options(data_root: str, max_iters: int, batch_size: int = 4, checkpoint_interval: int | None = None,
                     **extra: Any) -> Dict[str, Any]:
    """``--cfg-options`` for a short deterministic run of the quick-start config on ``data_root``.

    Single-process data loading, no dropout, checkpoints every ``checkpoint_interval`` (default: at the end),
    validation at the end only. ``extra`` adds or replaces options.
    """
    options: Dict[str, Any] = {
        'train_dataloader.dataset.data_root': data_root,
        'val_dataloader.dataset.data_root': data_root,
        'test_dataloader.dataset.data_root': data_root,
        'train_dataloader.batch_size': batch_size,
        'train_dataloader.num_workers': 0,
        'train_dataloader.persistent_workers': False,
        'val_dataloader.num_workers': 0,
        'val_dataloader.persistent_workers': False,
        'test_dataloader.num_workers': 0,
        'test_dataloader.persistent_workers': False,
        'train_cfg.max_iters': max_iters,
        'train_cfg.val_interval': max_iters,
        'default_hooks.checkpoint.interval': checkpoint_interval or max_iters,
        'default_hooks.checkpoint.max_keep_ckpts': 3,
        'default_hooks.logger.interval': 1,
        'model.decode_head.dropout_ratio': 0.0,
        'model.auxiliary_head.dropout_ratio': 0.0,
    }
    options.update(extra)
    return options


def as_cli(options: Dict[str, Any]) -> List[str]:
    """The options as ``key=value`` strings for ``--cfg-options`` (lists as ``[a,b]``, None as ``None``)."""
    def fmt(value):
        if isinstance(value, (list, tuple)):
            return '[' + ','.join(fmt(v) for v in value) + ']'
        return str(value)
    return [f'{key}={fmt(value)}' for key, value in options.items()]
