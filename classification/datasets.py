"""ImageNet and its variants as plain ``torch.utils.data.Dataset``s registered in MMEngine's DATASETS.

Every dataset's labels index the IN-1K class list (WordNet ids in sorted order), because the probe's logits do:

* ``ImageNetFolder``: ``root/<wnid>/<image>`` (IN-1K train and val, ImageNet-Sketch). With
  ``class_subset='imagenet_a'`` / ``'imagenet_r'`` (the published 200-class masks, timm's shipped index lists) the
  folders must be exactly those classes and the metric restricts the 1000-way logits to them
  (``class_subset_from_folders=True``: whichever classes the folders hold, for small test sets).
* ``ImageNetFileList``: ``ann_file`` lines ``<relative path> <label>`` under ``data_root``.
* ``ImageNetV2Folder``: the matched-frequency release, folders named ``0`` ... ``999`` by class index.
* ``ImageNetReaL``: IN-1K val images (class folders or flat) with the reassessed multi-label json
  (``real.json``: one list of IN-1K indices per val image, in val-file-number order; empty lists are unlabeled).
* ``HeldOutSplit``: a deterministic, stratified part of a training set, for choosing among sweep heads.

A missing or unexpected class folder, a bad annotation line or an unreadable image is an error naming the path.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from mmengine.registry import DATASETS, FUNCTIONS
from PIL import Image
from torch.utils.data import Dataset

from .transforms import build_pipeline, describe_pipeline

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.ppm')
_REAL_NAME = re.compile(r'ILSVRC2012_val_(\d{8})')


class DatasetLayoutError(ValueError):
    """A dataset folder or annotation file does not have the expected layout; the message names the path."""


class ImageReadError(RuntimeError):
    """An image file could not be decoded; the message names the file."""


def read_class_list(source: str | Sequence[str]) -> list[str]:
    """Class names (WordNet ids) from a list, a directory (its sub-folders, sorted) or a text file (the first
    word of each non-empty line, e.g. ``LOC_synset_mapping.txt`` or one wnid per line)."""
    if isinstance(source, (list, tuple)):
        classes = [str(c) for c in source]
    else:
        path = Path(source)
        if path.is_dir():
            classes = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
        elif path.is_file():
            classes = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        else:
            raise DatasetLayoutError(f'class list {source} does not exist (expected a folder of class folders or a '
                                     f'text file with one WordNet id per line)')
    if not classes:
        raise DatasetLayoutError(f'class list {source!r} is empty')
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:
        raise DatasetLayoutError(f'class list {source!r} repeats {duplicates[:5]}')
    return classes


PUBLISHED_SUBSETS = {'imagenet_a': 'imagenet_a_indices.txt', 'imagenet_r': 'imagenet_r_indices.txt'}


def published_class_subset(subset, num_classes: int = 1000) -> list[int]:
    """IN-1K class indices of a 200-class set: ``'imagenet_a'`` / ``'imagenet_r'`` read timm's shipped lists (the
    published masks), a list is taken as given."""
    if isinstance(subset, str):
        if subset not in PUBLISHED_SUBSETS:
            raise ValueError(f'class_subset must be one of {sorted(PUBLISHED_SUBSETS)} or a list of indices, '
                             f'got {subset!r}')
        from importlib.resources import files
        text = files('timm.data').joinpath('_info', PUBLISHED_SUBSETS[subset]).read_text()
        indices = [int(line) for line in text.split()]
    else:
        indices = [int(i) for i in subset]
    bad = [i for i in indices if not 0 <= i < num_classes]
    if bad or len(set(indices)) != len(indices):
        raise ValueError(f'class_subset {subset!r}: indices must be distinct and within 0..{num_classes - 1}')
    return sorted(indices)


def _class_source_name(source) -> str:
    return f'{len(source)} given classes' if isinstance(source, (list, tuple)) else str(source)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert('RGB')
    except Exception as err:  # PIL raises many types for broken files; all of them mean the same to a user
        raise ImageReadError(f'cannot read image {path}: {type(err).__name__}: {err}') from err


class ProbeImageDataset(Dataset):
    """Samples ``(path, label)`` with labels into ``classes``, loaded and transformed one at a time."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], pipeline, *, name: str, root: str,
                 class_subset: list[int] | None = None, real_labels: list[list[int]] | None = None):
        if not samples:
            raise DatasetLayoutError(f'{name}: no images found under {root}')
        self.samples = samples
        self.classes = classes
        self.pipeline = build_pipeline(pipeline)
        self.name = name
        self.root = str(root)
        self.class_subset = class_subset
        self.real_labels = real_labels
        self.labels = np.asarray([label for _, label in samples], dtype=np.int64)
        self._file_list_sha256: str | None = None

    @property
    def metainfo(self) -> dict:
        return dict(name=self.name, classes=self.classes, num_classes=len(self.classes),
                    class_subset=self.class_subset)

    def __len__(self) -> int:
        return len(self.samples)

    def file_list_sha256(self) -> str:
        """sha256 over every image's relative path, label, size and modification time: a feature cache made from
        other files, or from files since replaced, differs from it."""
        if self._file_list_sha256 is None:  # the list is fixed once built; the cache hooks ask every epoch
            digest = hashlib.sha256()
            for path, label in self.samples:
                try:
                    st = os.stat(path)
                    stat = f'{st.st_size}\t{st.st_mtime_ns}'
                except OSError:
                    stat = 'missing'
                digest.update(f'{os.path.relpath(path, self.root)}\t{label}\t{stat}\n'.encode())
            self._file_list_sha256 = digest.hexdigest()
        return self._file_list_sha256

    def describe(self) -> dict:
        """What a feature cache must match: the images, their labels and how they are transformed."""
        return dict(type=type(self).__name__, root=os.path.realpath(self.root), num_samples=len(self),
                    file_list_sha256=self.file_list_sha256(), transform=describe_pipeline(self.pipeline))

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        return dict(inputs=self.pipeline(load_image(path)), label=label, index=index,
                    real_labels=None if self.real_labels is None else self.real_labels[index],
                    input_kind='images')


def _folder_samples(root: Path, folders: dict[str, int], name: str) -> list[tuple[str, int]]:
    samples = []
    for folder, label in folders.items():
        images = _images_in(root / folder)
        if not images:
            raise DatasetLayoutError(f'{name}: class folder {root / folder} holds no images '
                                     f'(extensions {", ".join(IMAGE_EXTENSIONS)})')
        samples.extend((str(p), label) for p in images)
    return samples


def _check_root(root: Path, name: str) -> None:
    if not root.is_dir():
        raise DatasetLayoutError(f'{name}: dataset folder {root} does not exist')


@DATASETS.register_module()
class ImageNetFolder(ProbeImageDataset):
    """``root/<wnid>/*.JPEG``.

    Args:
        root: the split folder (e.g. ``data/imagenet/val``).
        classes: the IN-1K class list (see ``read_class_list``); None: the sub-folders of ``root`` are the
            classes. With a list, every class must have its folder and every folder must be a class.
        class_subset: the published 200-class mask of ImageNet-A or -R (``'imagenet_a'``, ``'imagenet_r'``: timm's
            shipped index lists) or a list of class indices: the folders must be exactly those classes, and the
            metric restricts the 1000-way logits to them.
        class_subset_from_folders: the folders are some subset of ``classes`` (small test sets); the metric
            restricts the logits to the classes present.
    """

    def __init__(self, root: str, pipeline, classes=None, class_subset_from_folders: bool = False,
                 name: str = 'IN-1K', class_subset=None):
        root_path = Path(root)
        _check_root(root_path, name)
        present = sorted(entry.name for entry in os.scandir(root_path) if entry.is_dir())
        class_list = read_class_list(classes) if classes is not None else present
        index = {c: i for i, c in enumerate(class_list)}
        subset = None
        if class_subset is not None:
            if classes is None or class_subset_from_folders:
                raise ValueError(f'{name}: class_subset needs the IN-1K class list in `classes` and excludes '
                                 f'class_subset_from_folders')
            subset = published_class_subset(class_subset, len(class_list))
            wanted = [class_list[i] for i in subset]
            present_set, wanted_set = set(present), set(wanted)
            missing = [c for c in wanted if c not in present_set]
            if missing:
                raise DatasetLayoutError(f'{name}: class folder {root_path / missing[0]} is missing ({len(missing)} '
                                         f'of the {len(wanted)} classes of {class_subset!r} missing)')
            extra = [f for f in present if f not in wanted_set]
            if extra:
                raise DatasetLayoutError(f'{name}: folder {root_path / extra[0]} is not one of the {len(wanted)} '
                                         f'classes of {class_subset!r} ({len(extra)} such folders)')
            folders = {c: index[c] for c in wanted}
        elif class_subset_from_folders:
            if classes is None:
                raise ValueError(f'{name}: class_subset_from_folders needs the IN-1K class list in `classes`')
            unknown = [f for f in present if f not in index]
            if unknown:
                raise DatasetLayoutError(f'{name}: folder {root_path / unknown[0]} is not a class of '
                                         f'{_class_source_name(classes)} ({len(unknown)} such folders)')
            if not present:
                raise DatasetLayoutError(f'{name}: no class folders under {root_path}')
            subset = sorted(index[f] for f in present)
            folders = {f: index[f] for f in present}
        else:
            present_set = set(present)
            missing = [c for c in class_list if c not in present_set]
            if missing:
                raise DatasetLayoutError(f'{name}: class folder {root_path / missing[0]} is missing '
                                         f'({len(missing)} of {len(class_list)} classes of '
                                         f'{_class_source_name(classes) if classes is not None else root} missing)')
            extra = [f for f in present if f not in index]
            if extra:
                raise DatasetLayoutError(f'{name}: folder {root_path / extra[0]} is not a class of '
                                         f'{_class_source_name(classes)}')
            folders = {c: index[c] for c in class_list}
        super().__init__(_folder_samples(root_path, folders, name), class_list, pipeline, name=name,
                         root=str(root_path), class_subset=subset)


@DATASETS.register_module()
class ImageNetFileList(ProbeImageDataset):
    """Images listed in ``ann_file`` as ``<path relative to data_root> <label>`` lines."""

    def __init__(self, data_root: str, ann_file: str, pipeline, classes, name: str = 'IN-1K'):
        class_list = read_class_list(classes)
        ann = Path(ann_file)
        if not ann.is_file():
            raise DatasetLayoutError(f'{name}: annotation file {ann} does not exist')
        samples = []
        for number, line in enumerate(ann.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
                raise DatasetLayoutError(f'{name}: {ann}:{number}: expected "<relative path> <label>", got {line!r}')
            label = int(parts[1])
            if not 0 <= label < len(class_list):
                raise DatasetLayoutError(f'{name}: {ann}:{number}: label {label} is outside 0..{len(class_list) - 1}')
            samples.append((os.path.join(data_root, parts[0]), label))
        super().__init__(samples, class_list, pipeline, name=name, root=data_root)


@DATASETS.register_module()
class ImageNetV2Folder(ProbeImageDataset):
    """ImageNet-V2 (matched frequency): ``root/<class index>/*.jpeg`` with folders ``0`` .. ``len(classes)-1``."""

    def __init__(self, root: str, pipeline, classes, name: str = 'V2'):
        root_path = Path(root)
        _check_root(root_path, name)
        class_list = read_class_list(classes)
        present = {entry.name for entry in os.scandir(root_path) if entry.is_dir()}
        expected = [str(i) for i in range(len(class_list))]
        missing = [f for f in expected if f not in present]
        if missing:
            raise DatasetLayoutError(f'{name}: class folder {root_path / missing[0]} is missing ({len(missing)} of '
                                     f'{len(expected)} index folders 0..{len(expected) - 1} missing)')
        extra = sorted(present - set(expected))
        if extra:
            raise DatasetLayoutError(f'{name}: folder {root_path / extra[0]} is not a class index '
                                     f'0..{len(expected) - 1}')
        super().__init__(_folder_samples(root_path, {f: int(f) for f in expected}, name), class_list, pipeline,
                         name=name, root=str(root_path))


@DATASETS.register_module()
class ImageNetReaL(ProbeImageDataset):
    """IN-1K val images with the ReaL labels: ``real_json[n - 1]`` belongs to ``ILSVRC2012_val_{n:08d}``.

    Images may sit in class folders (the usual val layout) or directly in ``root``. Accuracy counts the images
    whose ReaL list is non-empty.
    """

    def __init__(self, root: str, real_json: str, pipeline, classes, name: str = 'ReaL'):
        root_path = Path(root)
        _check_root(root_path, name)
        class_list = read_class_list(classes)
        index = {c: i for i, c in enumerate(class_list)}
        try:
            real = json.loads(Path(real_json).read_text())
        except (OSError, ValueError) as err:
            raise DatasetLayoutError(f'{name}: cannot read ReaL labels {real_json}: {err}') from err
        if not isinstance(real, list) or not all(isinstance(r, list) for r in real):
            raise DatasetLayoutError(f'{name}: {real_json} must be a json list of label lists (one per val image)')
        files = [(p, -1) for p in _images_in(root_path)]
        for entry in sorted(os.scandir(root_path), key=lambda e: e.name):
            if entry.is_dir():
                if entry.name not in index:
                    raise DatasetLayoutError(f'{name}: folder {root_path / entry.name} is not a class of '
                                             f'{_class_source_name(classes)}')
                files.extend((p, index[entry.name]) for p in _images_in(root_path / entry.name))
        samples, real_labels = [], []
        for path, label in files:
            match = _REAL_NAME.search(path.name)
            if not match:
                raise DatasetLayoutError(f'{name}: image {path} is not named ILSVRC2012_val_<8 digits>, so its ReaL '
                                         f'labels cannot be found')
            number = int(match.group(1))
            if not 1 <= number <= len(real):
                raise DatasetLayoutError(f'{name}: image {path} is val image {number}, but {real_json} has labels '
                                         f'for images 1..{len(real)}')
            labels = [int(v) for v in real[number - 1]]
            bad = [v for v in labels if not 0 <= v < len(class_list)]
            if bad:
                raise DatasetLayoutError(f'{name}: {real_json} entry {number - 1} has label {bad[0]} outside '
                                         f'0..{len(class_list) - 1}')
            samples.append((str(path), label))
            real_labels.append(labels)
        super().__init__(samples, class_list, pipeline, name=name, root=str(root_path), real_labels=real_labels)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a held-out part: ``round(fraction * n_c)`` images of each class c (at least one, never
    all), chosen by a generator seeded with (seed, class) so the split does not depend on rank or class order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f'held-out fraction must be in [0, 1), got {fraction}')
    if fraction == 0.0:
        return np.zeros(0, dtype=np.int64)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        k = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        rng = np.random.default_rng([int(seed), int(label) & 0xFFFFFFFF])
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


@DATASETS.register_module()
class HeldOutSplit(Dataset):
    """The ``'train'`` or ``'heldout'`` part of a training set (stratified, deterministic; see
    ``stratified_holdout``). Both parts built with the same fraction and seed are disjoint and cover the set.

    ``sweep`` ties the split to the model's sweep switch (``ProbeRunner`` sets it from ``model.sweep``): False
    holds nothing out (the single head trains on the whole set, the held-out part is empty), True needs a
    ``fraction`` above 0 (a sweep chooses its head on held-out training data, never on an evaluation set), None
    uses ``fraction`` as given.
    """

    def __init__(self, dataset, part: str, fraction: float = 0.01, seed: int = 0, sweep: bool | None = None):
        if part not in ('train', 'heldout'):
            raise ValueError(f"HeldOutSplit part must be 'train' or 'heldout', got {part!r}")
        if sweep not in (None, True, False):
            raise TypeError(f'HeldOutSplit sweep must be True, False or None, got {sweep!r}')
        if sweep and not float(fraction) > 0.0:
            raise ValueError(f'the sweep (model.sweep=True) chooses its head on held-out training data, but the '
                             f'held-out fraction is {fraction}; set it above 0 (heads are never chosen on an '
                             f'evaluation set)')
        self.dataset = DATASETS.build(dataset) if isinstance(dataset, dict) else dataset
        self.sweep = sweep
        self.part, self.fraction, self.seed = part, 0.0 if sweep is False else float(fraction), int(seed)
        heldout = stratified_holdout(np.asarray(self.dataset.labels), self.fraction, self.seed)
        if part == 'heldout':
            self.indices = heldout
        else:
            keep = np.ones(len(self.dataset), dtype=bool)
            keep[heldout] = False
            self.indices = np.flatnonzero(keep)
        self.labels = np.asarray(self.dataset.labels)[self.indices]

    @property
    def metainfo(self) -> dict:
        return dict(self.dataset.metainfo, name=f'{self.dataset.metainfo["name"]}-{self.part}')

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[int(self.indices[index])]


@FUNCTIONS.register_module()
def probe_collate(batch: list[dict]) -> dict:
    """Stack images (uint8) or cached summaries; labels, dataset indices and ReaL label lists ride along."""
    kinds = {item['input_kind'] for item in batch}
    if len(kinds) != 1:
        raise ValueError(f'a batch mixes input kinds {sorted(kinds)}')
    real = [item['real_labels'] for item in batch]
    return dict(inputs=torch.stack([item['inputs'] for item in batch]),
                data_samples=dict(labels=torch.tensor([item['label'] for item in batch], dtype=torch.long),
                                  indices=torch.tensor([item['index'] for item in batch], dtype=torch.long),
                                  real_labels=None if all(r is None for r in real) else real),
                input_kind=kinds.pop())
