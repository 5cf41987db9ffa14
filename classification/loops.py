"""One test run over every configured ImageNet set, printed as the published table."""
from __future__ import annotations

import copy
import logging
import math

import torch
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import LOOPS
from mmengine.runner.base_loop import BaseLoop

from .datasets import DatasetLayoutError
from .feature_cache import prepare_feature_caches


class MissingEvaluationSetError(RuntimeError):
    """One or more test sets could not be evaluated; raised after the others were (non-zero exit)."""


def format_results_table(results: dict[str, dict], reference: dict[str, float] | None = None,
                         title: str = 'linear probe') -> str:
    """Markdown table: one column per set, rows top-1 / top-5 (and the published top-1 when given)."""
    names = list(results)

    def cell(value) -> str:
        return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.2f}'

    lines = [f'| {title} | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
    for key, label in (('top1', 'top-1'), ('top5', 'top-5'), ('ema_top1', 'EMA top-1'), ('ema_top5', 'EMA top-5')):
        if key.startswith('top') or any(key in results[n] for n in names):
            lines.append(f'| {label} | ' + ' | '.join(cell(results[n].get(key)) for n in names) + ' |')
    if reference:
        lines.append('| published top-1 | ' + ' | '.join(
            '-' if reference.get(n) is None else f'{reference[n]:.1f}' for n in names) + ' |')
    return '\n'.join(lines)


def _with_pipeline(dataset, pipeline):
    """A dataset config with the pipeline of its innermost dataset (through wrappers' ``dataset``) replaced."""
    if pipeline is None or not isinstance(dataset, dict):
        return dataset
    dataset = copy.deepcopy(dataset)
    if 'pipeline' in dataset or 'dataset' not in dataset:
        dataset['pipeline'] = copy.deepcopy(pipeline)
    else:
        dataset['dataset'] = _with_pipeline(dataset['dataset'], pipeline)
    return dataset


@LOOPS.register_module()
class MultiSetTestLoop(BaseLoop):
    """Tests the probe on several datasets in turn and prints a table like the published one.

    Args:
        dataloader: the template for every set's dataloader (batch size, workers, sampler, collate); its
            ``dataset`` is replaced by each set's.
        evaluator: the default metric for sets that name none.
        sets: ``[dict(name=..., dataset=..., metric=...), ...]`` in table order, e.g. IN-1K, ReaL, V2, A, R,
            Sketch. (A list: MMEngine pretty-prints a config's dict of dicts very slowly, at every checkpoint.)
        pipeline: if given, the transform of every set (its innermost dataset's ``pipeline``), so a config can
            change the test resolution in one place.
        only: test just these set names (e.g. ``--cfg-options "test_cfg.only=['IN-1K','V2']"``).
        skip: leave these set names out (e.g. ``--cfg-options "test_cfg.skip=['A']"``).
        reference: published top-1 per set name, printed as the last row.
    Metrics come back as ``<name>/top1``, ``<name>/top5`` (and ``<name>/ema_top1``, ... for the EMA head). A
    sweep checkpoint whose head was not chosen on held-out data is refused. A set whose data is missing (or
    malformed) does not stop the others: it is reported with the path looked at, and after the table the run
    raises ``MissingEvaluationSetError`` (a non-zero exit) unless the set was skipped explicitly.
    """

    def __init__(self, runner, dataloader, evaluator, sets: list, pipeline: dict | None = None, only=None,
                 reference: dict | None = None, title: str = 'InternViT linear probe', skip=None):
        self._runner = runner
        self.template = copy.deepcopy(dataloader)
        self.default_metric = evaluator
        if not sets:
            raise ValueError('MultiSetTestLoop needs at least one set in `sets`')
        names = [spec.get('name') for spec in sets]
        if None in names or len(set(names)) != len(names):
            raise ValueError(f'every test set needs a unique name, got {names}')
        if only:
            unknown = [n for n in only if n not in names]
            if unknown:
                raise ValueError(f'unknown test set(s) {unknown}; configured sets: {names}')
            sets = [spec for spec in sets if spec['name'] in only]
        if skip:
            unknown = [n for n in skip if n not in names]
            if unknown:
                raise ValueError(f'unknown test set(s) {unknown} in skip; configured sets: {names}')
            sets = [spec for spec in sets if spec['name'] not in skip]
        self.sets = [dict(spec, dataset=_with_pipeline(spec['dataset'], pipeline)) for spec in sets]
        self.reference = reference
        self.title = title
        self.dataloader = None

    def _model(self):
        model = self.runner.model
        return model.module if is_model_wrapper(model) else model

    def run(self) -> dict:
        model = self._model()
        if len(model.heads) > 1 and model.selection is None:
            raise RuntimeError(f'this model has {len(model.heads)} heads (a sweep) but none was chosen on held-out '
                               f'data; load a checkpoint trained with HeadSelectionHook')
        self.runner.call_hook('before_test')
        self.runner.call_hook('before_test_epoch')
        self.runner.model.eval()
        metrics, table, missing = {}, {}, {}
        for spec in self.sets:
            name = spec['name']
            try:
                set_metrics = self._run_set(spec)
            except (DatasetLayoutError, FileNotFoundError) as err:  # data absent or malformed: the others go on
                print_log(f'test set {name} is missing: {err}', logger='current', level=logging.ERROR)
                missing[name], set_metrics = str(err), {}
            table[name] = set_metrics
            metrics.update({f'{name}/{k}': v for k, v in set_metrics.items()})
        head = model.heads[int(model.selected_head)]
        print_log(f'head {head.name}\n' + format_results_table(table, self.reference, self.title), logger='current')
        self.runner.call_hook('after_test_epoch', metrics=metrics)
        self.runner.call_hook('after_test')
        if missing:
            raise MissingEvaluationSetError(
                f'{len(missing)} of {len(self.sets)} test sets could not be evaluated (the others are in the table '
                f'above):\n  ' + '\n  '.join(f'{n}: {why}' for n, why in missing.items())
                + "\nProvide them, or leave them out explicitly: --cfg-options \"test_cfg.skip=['"
                + "','".join(missing) + "']\"")
        return metrics

    def _run_set(self, spec: dict) -> dict:
        loader_cfg = copy.deepcopy(self.template)
        loader_cfg['dataset'] = spec['dataset']
        self.dataloader = self.runner.build_dataloader(loader_cfg, seed=self.runner.seed)
        prepare_feature_caches(self.dataloader.dataset, self._model())
        evaluator = self.runner.build_evaluator(copy.deepcopy(spec.get('metric', self.default_metric)))
        evaluator.dataset_meta = self.dataloader.dataset.metainfo
        for idx, batch in enumerate(self.dataloader):
            self.runner.call_hook('before_test_iter', batch_idx=idx, data_batch=batch)
            with torch.no_grad():  # the backbone sets its own dtype (bf16 on GPU); heads stay fp32
                outputs = self.runner.model.test_step(batch)
            evaluator.process(data_samples=outputs, data_batch=batch)
            self.runner.call_hook('after_test_iter', batch_idx=idx, data_batch=batch, outputs=outputs)
        return evaluator.evaluate(len(self.dataloader.dataset))
