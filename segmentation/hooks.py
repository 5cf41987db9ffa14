"""Hooks: prediction overlays as PNG files, and a check that data-parallel ranks hold the same weights."""
from __future__ import annotations

import os
import os.path as osp
from typing import Optional, Sequence

import mmcv
import torch
from mmengine import dist, fileio
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from torch.distributed.fsdp import FullyShardedDataParallel

from ._registry import register_everywhere


@register_everywhere('HOOKS')
class SegOverlayHook(Hook):
    """Writes ``out_dir/<image name>.png``: the image with ground truth (left) and prediction (right) overlaid.

    Uses the runner's ``SegLocalVisualizer`` (``visualizer=dict(type='SegLocalVisualizer')`` in the config) and
    the dataset's palette. ``max_images`` limits how many files are written (all by default).
    """

    priority = 'LOW'

    def __init__(self, out_dir: str, max_images: Optional[int] = None, draw_gt: bool = True, alpha: float = 0.6):
        self.out_dir = out_dir
        self.max_images = max_images
        self.draw_gt = draw_gt
        self.alpha = alpha
        self.written = 0

    def before_test(self, runner) -> None:
        from mmseg.visualization import SegLocalVisualizer
        if not isinstance(runner.visualizer, SegLocalVisualizer):
            raise TypeError(f'SegOverlayHook needs visualizer=dict(type="SegLocalVisualizer") in the config, '
                            f'got {type(runner.visualizer).__name__}')
        runner.visualizer.alpha = self.alpha
        os.makedirs(self.out_dir, exist_ok=True)
        self.written = 0

    def after_test_iter(self, runner, batch_idx: int, data_batch=None, outputs: Sequence = ()) -> None:
        for sample in outputs:
            if self.max_images is not None and self.written >= self.max_images:
                return
            img = mmcv.imfrombytes(fileio.get(sample.img_path), channel_order='rgb')
            name = osp.splitext(osp.basename(sample.img_path))[0]
            out_file = osp.join(self.out_dir, f'{name}.png')
            runner.visualizer.add_datasample(name, img, data_sample=sample, draw_gt=self.draw_gt and
                                             'gt_sem_seg' in sample, draw_pred=True, show=False, out_file=out_file)
            self.written += 1

    def after_test(self, runner) -> None:
        print_log(f'SegOverlayHook: wrote {self.written} overlay PNGs to {self.out_dir}', logger='current')


@register_everywhere('HOOKS')
class RankConsistencyHook(Hook):
    """After training, checks that every data-parallel rank holds the same weights (DDP must keep them equal).

    Compares a per-tensor fingerprint (sum and sum of squares in float64) of every parameter across ranks and raises
    ``RuntimeError`` naming the first one that differs. Buffers are not compared: BatchNorm running statistics
    differ between ranks unless SyncBN is used. Sharded wrappers (FSDP) are skipped.
    """

    def after_train(self, runner) -> None:
        if not dist.is_distributed():
            return
        model = runner.model
        if isinstance(model, FullyShardedDataParallel):
            print_log('RankConsistencyHook: sharded model, skipped', logger='current')
            return
        module = model.module if is_model_wrapper(model) else model
        names, prints = [], []
        for name, tensor in module.named_parameters():
            values = tensor.detach().double()
            names.append(name)
            prints.append(torch.stack([values.sum(), values.pow(2).sum()]))
        local = torch.stack(prints).cpu()
        gathered = dist.all_gather(local)
        for rank, other in enumerate(gathered):
            if not torch.equal(other.cpu(), local):
                first = int((other.cpu() != local).any(dim=1).nonzero()[0])
                raise RuntimeError(f'RankConsistencyHook: rank {dist.get_rank()} and rank {rank} hold different '
                                   f'values of {names[first]}')
        print_log(f'RankConsistencyHook: {len(names)} parameters identical on all {dist.get_world_size()} ranks',
                  logger='current')


@register_everywhere('HOOKS')
class FinalWeightsHook(Hook):
    """After training, also writes ``{work_dir}/weights_iter_{N}.pth``: the model's full state dict (plus meta), no
    optimizer state, in the ordinary MMEngine checkpoint layout that ``tools/export_to_chat.py`` and
    ``tools/test.py`` read.

    Meant for DeepSpeed, whose regular checkpoints (``iter_N.pth/``) are DeepSpeed folders of ZeRO shards: with
    ``save_optimizer=False`` MMEngine's ``DeepSpeedStrategy`` writes a plain file instead, gathering ZeRO-3's
    partitioned weights, which needs ``zero_optimization.stage3_gather_16bit_weights_on_model_save=True`` (the
    weights are then 16-bit, bf16 under ``bf16.enabled``). Every rank must run it (the gathering is collective).
    """

    priority = 'VERY_LOW'

    def __init__(self, filename_tmpl: str = 'weights_iter_{}.pth'):
        self.filename_tmpl = filename_tmpl

    def after_train(self, runner) -> None:
        filename = self.filename_tmpl.format(runner.iter)
        runner.save_checkpoint(runner.work_dir, filename, save_optimizer=False, save_param_scheduler=False,
                               by_epoch=False)
        print_log(f'FinalWeightsHook: wrote {osp.join(runner.work_dir, filename)} (weights only)', logger='current')
