"""mmseg's IoUMetric that also writes its per-class table as files a person (or a spreadsheet) can open."""
from __future__ import annotations

import csv
import io
import json
import os
import os.path as osp
from typing import Dict

import numpy as np
from mmengine.logging import MessageHub, MMLogger, print_log
from mmseg.evaluation.metrics import IoUMetric

from ._registry import register_everywhere


def _write_atomic(path: str, text: str) -> None:
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


@register_everywhere('METRICS')
class IoUTableMetric(IoUMetric):
    """``IoUMetric`` (same arguments, same returned metrics) that writes ``per_class_results.csv`` and
    ``per_class_results.json`` next to the run's log file after every evaluation (the latest one; the JSON also
    holds the summary metrics and the iteration). Per-class IoU and Acc in percent, ``nan`` for a class absent from
    both prediction and ground truth, as in the logged table."""

    def compute_metrics(self, results: list) -> Dict[str, float]:
        metrics = super().compute_metrics(results)
        if self.format_only or not results:
            return metrics
        intersect, union, pred, label = (sum(column) for column in zip(*results))
        per_class = self.total_area_to_metrics(intersect, union, pred, label, self.metrics, self.nan_to_num,
                                               self.beta)
        per_class.pop('aAcc', None)
        classes = list(self.dataset_meta['classes'])
        rows = [{'class': name, **{key: round(float(np.asarray(values)[i]) * 100, 2)
                                   for key, values in per_class.items()}} for i, name in enumerate(classes)]
        log_file = MMLogger.get_current_instance().log_file
        out_dir = osp.dirname(log_file) if log_file else None
        if out_dir is None or not osp.isdir(out_dir):
            return metrics
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        _write_atomic(osp.join(out_dir, 'per_class_results.csv'), buffer.getvalue())
        summary = {k: float(v) for k, v in metrics.items()}
        last = MessageHub.get_current_instance().get_info('iter')  # index of the last training iteration run
        record = dict(iter=None if last is None else last + 1, metrics=summary, per_class=rows)
        _write_atomic(osp.join(out_dir, 'per_class_results.json'),
                      json.dumps(record, indent=1, allow_nan=True) + '\n')
        print_log(f'per-class results written to {out_dir}/per_class_results.{{csv,json}}', logger='current')
        return metrics
