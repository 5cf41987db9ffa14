"""ADE20K with input checks and deterministic few-shot subsets; the synthetic dataset of the quick start.

Few-shot subsets (``fraction=1/16`` ... ``1``): every training image is ranked by
``sha256(f'{seed}/{name}')``, where ``name`` is the image's path relative to the image folder without its suffix
(e.g. ``ADE_train_00000001``); a subset keeps the first ``floor(n * fraction + 0.5)`` images of that ranking. The
ranking depends only on the names and the seed -- not on file-system order, the machine or the run -- and a smaller
fraction keeps a prefix of the same ranking, so subsets are nested (1/16 in 1/8 in ... in 1/1). On ADE20K's 20,210
training images: 1263 / 2526 / 5053 / 10105 / 20210 images. ``python -m segmentation.few_shot`` writes the split files.
"""
from __future__ import annotations

import hashlib
import math
import os.path as osp
from typing import Iterable, List, Optional

import numpy as np
from mmengine import fileio
from mmseg.datasets import ADE20KDataset
from mmseg.datasets.transforms import LoadAnnotations

from ._registry import register_everywhere
from .synthetic import METAINFO as SYNTHETIC_METAINFO


def subset_rank_key(name: str, seed: int) -> str:
    return hashlib.sha256(f'{seed}/{name}'.encode('utf-8')).hexdigest()


def few_shot_size(total: int, fraction: float) -> int:
    return max(1, math.floor(total * fraction + 0.5)) if total else 0


def few_shot_subset(names: Iterable[str], fraction: float, seed: int = 0) -> List[str]:
    """The names in the ``fraction`` subset, in ranking order (see the module docstring)."""
    if not 0 < fraction <= 1:
        raise ValueError(f'few-shot fraction must be in (0, 1], got {fraction}')
    unique = sorted(set(names))
    ranked = sorted(unique, key=lambda name: (subset_rank_key(name, seed), name))
    return ranked[:few_shot_size(len(ranked), fraction)]


def published_shuffle_subset(file_names: Iterable[str], fraction: float, seed: int) -> List[str]:
    """The subset InternVL's mmseg-0.x ADE20K dataset drew with ``max_image_num = 20210 // k``: the image file names
    sorted, shuffled by Python's ``random`` seeded with the run's seed, the first ``floor(n * fraction)`` kept.

    This reproduces a published subset only with the seed of that run (mmseg 0.x logged it as "Set random seed to
    N"; the configs do not fix it) and only if nothing drew from Python's ``random`` between seeding and building
    the dataset (the published ``train.py`` builds the model in between; its initialisation uses torch's generator).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f'few-shot fraction must be in (0, 1], got {fraction}')
    import random
    names = sorted(set(file_names))
    random.Random(seed).shuffle(names)
    return names[:math.floor(len(names) * fraction)]


def _relative_stem(path: str, folder: str, suffix: str) -> str:
    rel = osp.relpath(path, folder) if folder else path
    return rel[:-len(suffix)] if suffix and rel.endswith(suffix) else osp.splitext(rel)[0]


@register_everywhere('DATASETS')
class CheckedADE20KDataset(ADE20KDataset):
    """mmseg's ADE20K dataset that checks its files and can keep a deterministic few-shot subset.

    Checks at load time (each error names the file or folder): the data root and the image/annotation folders
    exist, the image folder holds images, every image has its annotation. ``LoadAndCheckAnnotations`` then checks
    each annotation's size and labels when it is read.

    Args:
        fraction: keep this fraction of the images (1/16, 1/8, 1/4, 1/2, 1); see the module docstring.
        subset_seed: seed of the few-shot ranking; the published-style splits use 0.
        subset_rule: ``'nested'`` (the project's: hash ranking, subsets nested, see the module docstring) or
            ``'published_shuffle'`` (the published code's seeded shuffle, ``published_shuffle_subset``; give the
            seed of the published run as ``subset_seed``).
        **kwargs: as for ``mmseg.datasets.ADE20KDataset``.
    """

    SUBSET_RULES = ('nested', 'published_shuffle')

    def __init__(self, *args, fraction: float = 1.0, subset_seed: int = 0, subset_rule: str = 'nested', **kwargs):
        if not 0 < fraction <= 1:
            raise ValueError(f'{type(self).__name__}: fraction must be in (0, 1], got {fraction}')
        if subset_rule not in self.SUBSET_RULES:
            raise ValueError(f'{type(self).__name__}: subset_rule must be one of {self.SUBSET_RULES}, '
                             f'got {subset_rule!r}')
        self.fraction = float(fraction)
        self.subset_seed = int(subset_seed)
        self.subset_rule = subset_rule
        super().__init__(*args, **kwargs)

    def _check_folders(self, img_dir: Optional[str], ann_dir: Optional[str]) -> None:
        name = type(self).__name__
        if self.data_root and not fileio.isdir(self.data_root, backend_args=self.backend_args):
            raise FileNotFoundError(f'{name}: dataset folder {self.data_root} (data_root) does not exist. Download '
                                    f'ADE20K (ADEChallengeData2016) there, or make the synthetic dataset with '
                                    f'tools/make_synthetic_ade20k.py')
        for key, folder in (('img_path', img_dir), ('seg_map_path', ann_dir)):
            if folder and not fileio.isdir(folder, backend_args=self.backend_args):
                raise FileNotFoundError(f'{name}: folder {folder} (data_prefix.{key}) does not exist')

    def load_data_list(self) -> List[dict]:
        img_dir = self.data_prefix.get('img_path')
        ann_dir = self.data_prefix.get('seg_map_path')
        self._check_folders(img_dir, ann_dir)
        data_list = super().load_data_list()
        if not data_list:
            raise FileNotFoundError(f'{type(self).__name__}: no images ending in {self.img_suffix} in {img_dir}'
                                    + (f' (listed by {self.ann_file})' if self.ann_file else ''))
        self._check_pairs(data_list)
        if self.fraction < 1 and self.subset_rule == 'published_shuffle':
            files = {osp.relpath(info['img_path'], img_dir) if img_dir else info['img_path']: info
                     for info in data_list}
            keep = published_shuffle_subset(files, self.fraction, self.subset_seed)
            data_list = sorted((files[name] for name in keep), key=lambda info: info['img_path'])
        elif self.fraction < 1:
            stems = {_relative_stem(info['img_path'], img_dir, self.img_suffix): info for info in data_list}
            keep = few_shot_subset(stems, self.fraction, self.subset_seed)
            data_list = sorted((stems[name] for name in keep), key=lambda info: info['img_path'])
        num_classes = len(self.metainfo['classes'])
        for info in data_list:
            info['num_classes'] = num_classes  # read by LoadAndCheckAnnotations
        return data_list

    def _check_pairs(self, data_list: List[dict]) -> None:
        for info in data_list:
            if not fileio.exists(info['img_path'], backend_args=self.backend_args):
                raise FileNotFoundError(f'{type(self).__name__}: image {info["img_path"]} does not exist')
            seg = info.get('seg_map_path')
            if seg is not None and not fileio.exists(seg, backend_args=self.backend_args):
                raise FileNotFoundError(f'{type(self).__name__}: image {info["img_path"]} has no annotation: '
                                        f'expected {seg}')


@register_everywhere('DATASETS')
class SyntheticADE20KDataset(CheckedADE20KDataset):
    """The synthetic dataset written by ``tools/make_synthetic_ade20k.py``: ADE20K's layout, five classes."""

    METAINFO = SYNTHETIC_METAINFO


@register_everywhere('TRANSFORMS')
class LoadAndCheckAnnotations(LoadAnnotations):
    """mmseg's ``LoadAnnotations``, then checks that the annotation fits its image and the classes.

    Raises ``ValueError`` naming the annotation file if it is not single-channel, if its size differs from the
    image's size as loaded (``ori_shape``), or if it holds a label outside the classes (after ADE20K's
    reduce-zero-label, valid values are ``0 .. num_classes - 1`` and the ignore index).

    Args:
        num_classes: number of classes; by default the dataset's (``CheckedADE20KDataset`` passes it along).
        ignore_index: the ignored label after loading (255 in mmseg).
    """

    def __init__(self, num_classes: Optional[int] = None, ignore_index: int = 255, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def transform(self, results: dict) -> dict:
        # A bare image (mmseg.apis.inference_model, MMSegInferencer, tools/image_demo.py) has no annotation to
        # load: mmseg strips only its own LoadAnnotations from the test pipeline, so this one passes it through.
        if 'seg_map_path' not in results:
            return results
        return super().transform(results)

    def _load_seg_map(self, results: dict) -> None:
        path = results['seg_map_path']
        try:
            super()._load_seg_map(results)
        except (OSError, ValueError, TypeError, AttributeError, SyntaxError) as err:  # PIL/cv2 decoding errors
            raise OSError(f'cannot read annotation {path}: the file is corrupt, truncated or not an image '
                          f'({type(err).__name__}: {err})') from err
        seg = results['gt_seg_map']
        if seg.ndim != 2:
            raise ValueError(f'annotation {path} has shape {seg.shape}; expected a single-channel label image')
        ori_shape = results.get('ori_shape')
        if ori_shape is not None and tuple(seg.shape) != tuple(ori_shape[:2]):
            raise ValueError(f'annotation {path} is {seg.shape[0]}x{seg.shape[1]} (HxW) but its image '
                             f'{results.get("img_path")} is {ori_shape[0]}x{ori_shape[1]}; they must be the same size')
        num_classes = self.num_classes if self.num_classes is not None else results.get('num_classes')
        if num_classes is None:
            raise KeyError('LoadAndCheckAnnotations needs num_classes: set it in the transform or use a dataset '
                           'that passes it (CheckedADE20KDataset)')
        invalid = (seg >= num_classes) & (seg != self.ignore_index)
        if invalid.any():
            values = np.unique(seg[invalid])
            reduce_zero = results.get('reduce_zero_label', False)
            raw = [int(v) + 1 for v in values] if reduce_zero else [int(v) for v in values]
            valid = f'0 (ignored) and 1..{num_classes}' if reduce_zero else f'0..{num_classes - 1}'
            raise ValueError(f'annotation {path} has label value(s) {raw[:10]} above the class count: the dataset '
                             f'has {num_classes} classes, so the file may only hold {valid} '
                             f'(or {self.ignore_index}, ignored)')


@register_everywhere('TRANSFORMS')
class ResizeShortSide:
    """Resize keeping the aspect ratio so that the short side is ``size`` (the long side is not limited).

    The published head/full-tuning test pipelines (mmseg 0.x ``SETR_Resize`` with ``setr_multi_scale``): the target
    is computed in floats and handed to mmcv's rescale, as there. mmseg 1.x's ``ResizeShortestEdge`` rounds the
    target first and caps the long side, which may differ by a pixel.
    """

    def __init__(self, size: int = 504, interpolation: str = 'bilinear'):
        from mmcv.transforms import Resize
        self.size = size
        self.resize = Resize(scale=(size, size), keep_ratio=True, interpolation=interpolation)

    def __call__(self, results: dict) -> dict:
        h, w = results['img'].shape[:2]
        # Floats, computed as published; mmcv's imrescale then takes the factor from them.
        self.resize.scale = (self.size, self.size * h / w) if h > w else (self.size * w / h, self.size)
        return self.resize(results)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(size={self.size})'
