"""Hooks: prepare feature caches before they are read; choose the sweep's head on held-out training data."""
from __future__ import annotations

import copy
import logging
import os

import torch
from mmengine.dist import all_reduce, is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from backbones.atomic import json_dump

from .datasets import HeldOutSplit
from .feature_cache import prepare_feature_caches
from .sweep_report import write_sweep_report


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


@HOOKS.register_module()
class FeatureCacheHook(Hook):
    """Extracts (or validates) every ``CachedFeatures`` of the train / val / test dataloaders before their loop
    starts. Harmless when no dataset is cached, so the classification runtime always includes it."""

    priority = 'VERY_HIGH'

    def before_train(self, runner) -> None:
        prepare_feature_caches(runner.train_dataloader.dataset, _unwrap(runner.model))

    def before_val(self, runner) -> None:
        prepare_feature_caches(runner.val_dataloader.dataset, _unwrap(runner.model))

    def before_test(self, runner) -> None:
        loader = getattr(runner.test_loop, 'dataloader', None)
        if loader is not None:  # MultiSetTestLoop prepares its own sets
            prepare_feature_caches(loader.dataset, _unwrap(runner.model))


@HOOKS.register_module()
class HeadSelectionHook(Hook):
    """Scores every head on a held-out part of the training split and makes the best one the model's prediction
    head, when the model is a sweep (``model.sweep=True``; the single head has nothing to choose and, under
    ``ProbeRunner``, no held-out data). Runs after each ``interval``-th epoch and after the last, before the
    CheckpointHook (priority VERY_LOW) saves that epoch, so each checkpoint carries its selection. Never sees an
    evaluation set: its dataloader should be a ``HeldOutSplit(part='heldout')`` of the training data.

    Args:
        dataloader: the held-out dataloader config; None reads the config's top-level ``heldout_dataloader``
            (so dataset configs can set it and children can override it like any other loader).
        interval: score and select every ``interval`` epochs (and always after the last).

    Writes ``heldout_selection.json`` (every head's held-out top-1 and the choice) to the work dir.
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self, dataloader: dict | None = None, interval: int = 1):
        self.dataloader_cfg = dataloader
        self.interval = interval
        self._loader = None

    def before_train(self, runner) -> None:
        self._loader = None
        model = _unwrap(runner.model)
        sweep = bool(getattr(model, 'sweep', len(model.heads) > 1))
        if not sweep:
            train = getattr(runner.train_dataloader, 'dataset', None)
            if not (isinstance(train, HeldOutSplit) and train.sweep is None and train.fraction > 0):
                return  # the single head trains on the whole split (ProbeRunner): nothing to choose or score
            # A runner that did not tie the split to model.sweep (plain Runner.from_cfg): score as configured.
            print_log(f'the single head trains on {len(train)} of {len(train.dataset)} training images: the '
                      "held-out split did not follow model.sweep (build the runner from the config's "
                      "runner_type='ProbeRunner', e.g. with tools/train.py)", logger='current', level=logging.WARNING)
        cfg = self.dataloader_cfg or runner.cfg.get('heldout_dataloader')
        if cfg is None:
            raise ValueError('HeadSelectionHook needs a held-out dataloader: give it `dataloader=` or set the '
                             "config's top-level `heldout_dataloader`")
        self._loader = runner.build_dataloader(copy.deepcopy(cfg), seed=runner.seed)
        if len(self._loader.dataset) == 0 and sweep:
            raise ValueError('HeadSelectionHook: the held-out split is empty, but the sweep (model.sweep=True, '
                             f'{len(model.heads)} heads) chooses its head on held-out training data, never on an '
                             'evaluation set; set the held-out fraction above 0')

    def after_train_epoch(self, runner) -> None:
        if self.every_n_epochs(runner, self.interval) or self.is_last_train_epoch(runner):
            self.select(runner)

    @torch.no_grad()
    def heldout_top1(self, model) -> torch.Tensor:
        """Top-1 (%) of every head on the held-out loader, summed over ranks."""
        prepare_feature_caches(self._loader.dataset, model)
        correct = torch.zeros(len(model.heads), dtype=torch.float64)
        seen = torch.zeros(1, dtype=torch.float64)
        was_training = model.training
        model.eval()
        try:
            for batch in self._loader:
                data = model.data_preprocessor(batch, False)
                inputs = data['inputs']
                summaries, tokens = model.features(inputs) if data['input_kind'] == 'images' else (inputs, None)
                predictions = model.head_logits(summaries, tokens=tokens).argmax(-1)  # [H, B]
                labels = data['data_samples']['labels']
                correct += (predictions == labels).sum(1).double().cpu()
                seen += labels.numel()
        finally:
            model.train(was_training)
        device = next(model.heads.parameters()).device
        totals = torch.cat([correct, seen]).to(device)
        all_reduce(totals, 'sum')
        totals = totals.cpu()
        if totals[-1] == 0:
            return torch.full((len(model.heads),), float('nan'), dtype=torch.float64)
        return 100.0 * totals[:-1] / totals[-1]

    def select(self, runner) -> None:
        if self._loader is None:
            return  # the single head, nothing held out: it stays the prediction head
        model = _unwrap(runner.model)
        top1 = self.heldout_top1(model)
        if torch.isnan(top1).all():
            return  # nothing held out: the single head stays selected (checked in before_train)
        best = int(torch.argmax(top1))  # ties go to the earlier head: deterministic on every rank
        model.selected_head.fill_(best)
        heads = [dict(name=h.name, feature=h.feature.name, lr=h.lr, heldout_top1=round(float(a), 4))
                 for h, a in zip(model.heads, top1)]
        model.selection = dict(epoch=runner.epoch + 1, selected=model.heads[best].name,
                               heldout_size=len(self._loader.dataset), heads=heads)
        runner.message_hub.update_scalar('heldout/top1', float(top1[best]))
        ranking = sorted(range(len(heads)), key=lambda i: -float(top1[i]))[:5]
        print_log(f'held-out top-1 after epoch {runner.epoch + 1}: selected {heads[best]["name"]} '
                  f'({float(top1[best]):.2f}%); best five: '
                  + ', '.join(f'{heads[i]["name"]} {float(top1[i]):.2f}' for i in ranking), logger='current')
        if is_main_process():
            path = os.path.join(runner.work_dir, 'heldout_selection.json')
            json_dump(model.selection, path, indent=1, ensure_ascii=True)
            table = write_sweep_report(runner.work_dir, model.selection)
            print_log(f'held-out top-1 (%) by feature x lr, chosen *; also heldout_grid.csv/.png in '
                      f'{runner.work_dir}:\n{table}', logger='current')


@HOOKS.register_module()
class HeadEMAHook(Hook):
    """After every optimizer step, moves each head's EMA copy towards it (``LinearProbe.update_ema``; the model's
    ``ema_decay``). Harmless when the model keeps no EMA, so the classification runtime always includes it."""

    priority = 'NORMAL'

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        wrapper = runner.optim_wrapper
        if hasattr(wrapper, 'should_update') and not wrapper.should_update():
            return  # gradient accumulation: no optimizer step this iteration
        _unwrap(runner.model).update_ema()


@HOOKS.register_module()
class ProbeCheckpointHook(CheckpointHook):
    """``CheckpointHook`` that keeps the best epoch of the plain head and of its EMA copy (``save_best=['top1',
    'ema_top1']``) and drops the EMA key when the model keeps no EMA (``model.ema_decay=None``). After training it
    logs, and writes to ``work_dir/best_and_last.json``, each key's best value (with its epoch) and last value: the
    published number is the best epoch of the plain head on IN-1K val."""

    def before_train(self, runner) -> None:
        if getattr(_unwrap(runner.model), 'ema_heads', None) is None and getattr(self, 'key_indicators', None):
            kept = [(k, r) for k, r in zip(self.key_indicators, self.rules) if not k.startswith('ema_')]
            self.key_indicators, self.rules = [k for k, _ in kept], [r for _, r in kept]
            if not self.key_indicators:
                self.save_best = None
        self._history: list[tuple[int, dict]] = []
        super().before_train(runner)

    def after_val_epoch(self, runner, metrics) -> None:
        self._history.append((runner.epoch, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
        super().after_val_epoch(runner, metrics)

    def after_train(self, runner) -> None:
        super().after_train(runner)
        history = getattr(self, '_history', None)
        if not history or not getattr(self, 'key_indicators', None):
            return
        summary = {}
        for key, rule in zip(self.key_indicators, self.rules):
            values = [(epoch, m[key]) for epoch, m in history if key in m]
            if not values:
                continue
            pick = max if rule == 'greater' else min
            best_epoch, best = pick(values, key=lambda item: item[1])
            summary[key] = dict(best=best, best_epoch=best_epoch, last=values[-1][1], last_epoch=values[-1][0])
        print_log('best and last: ' + '; '.join(f"{k} best {v['best']:.2f} (epoch {v['best_epoch']}), last "
                                                f"{v['last']:.2f} (epoch {v['last_epoch']})"
                                                for k, v in summary.items()), logger='current')
        if is_main_process():
            json_dump(summary, os.path.join(runner.work_dir, 'best_and_last.json'), indent=1)
