"""A small synthetic segmentation dataset in ADE20K's folder layout, learnable by a tiny model on a CPU.

Layout (as ADEChallengeData2016)::

    ROOT/images/{training,validation}/synth_{split}_{i:05d}.jpg
    ROOT/annotations/{training,validation}/synth_{split}_{i:05d}.png   (uint8; 0 = unlabeled, 1..5 = classes)

Each image is a landscape: sky above a horizon, a ground class below, and one to three shapes (rectangles and
ellipses) of other classes. Each class has its own colour and texture; shape outlines are left unlabeled (0), as
ADE20K leaves some pixels unlabeled, so reduce-zero-label ignores them. Image sizes vary around ``size`` and are
mostly not multiples of 14, which exercises the padding that InternViT's patch size needs. Image ``i`` of a split
depends only on ``(seed, split, i)``.
"""
from __future__ import annotations

import json
import os
import os.path as osp

import numpy as np
from PIL import Image

from backbones.atomic import atomic_dir

CLASSES = ('sky', 'grass', 'water', 'sand', 'brick')
PALETTE = [[135, 190, 235], [60, 150, 50], [30, 90, 170], [210, 190, 130], [160, 60, 40]]
METAINFO = dict(classes=CLASSES, palette=PALETTE)
SPLITS = ('training', 'validation')
SKY, GRASS, WATER, SAND, BRICK = range(1, 6)  # label values in the files (0 = unlabeled)


def _texture(label: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB float image of class ``label``'s texture."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.array(PALETTE[label - 1], dtype=np.float32)
    img = np.broadcast_to(base, (h, w, 3)).copy()
    if label == SKY:  # vertical gradient, lighter towards the horizon
        img += (yy / max(h - 1, 1))[..., None] * np.array([50, 30, 15], np.float32)
        img += rng.normal(0, 3, (h, w, 1))
    elif label == GRASS:  # noisy with vertical streaks
        img += rng.normal(0, 18, (h, w, 1)) + 12 * np.sin(xx * 1.3 + rng.uniform(0, 6))[..., None]
    elif label == WATER:  # horizontal waves
        img += 25 * np.sin(yy * 0.9 + 0.3 * np.sin(xx * 0.2) + rng.uniform(0, 6))[..., None]
        img += rng.normal(0, 4, (h, w, 1))
    elif label == SAND:  # fine speckle
        img += rng.normal(0, 14, (h, w, 3))
    elif label == BRICK:  # bricks with light mortar lines, every other row shifted
        phase_y, phase_x = rng.integers(0, 8), rng.integers(0, 16)
        row = ((yy + phase_y) // 8).astype(int)
        mortar = ((yy + phase_y) % 8 < 1.5) | (((xx + phase_x + 8 * (row % 2)) % 16) < 1.5)
        img[mortar] = (200, 200, 195)
        img += rng.normal(0, 5, (h, w, 1))
    return img


def make_sample(seed: int, split: str, index: int, size: int = 168) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3 uint8 RGB) and its label map (H, W uint8, ADE20K convention)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    h, w = (int(v) for v in rng.integers(int(size * 0.85), int(size * 1.15) + 1, size=2))
    labels = np.empty((h, w), np.uint8)
    horizon = int(rng.integers(h // 4, 3 * h // 4))
    labels[:horizon] = SKY
    labels[horizon:] = rng.choice([GRASS, WATER, SAND])
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(1, 4))):
        label = int(rng.choice([GRASS, WATER, SAND, BRICK]))
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        ry, rx = rng.integers(h // 10, h // 3), rng.integers(w // 10, w // 3)
        if rng.random() < 0.5:
            inside = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            ring = inside & ~((np.abs(yy - cy) <= ry - 1) & (np.abs(xx - cx) <= rx - 1))
        else:
            dist = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            inside, ring = dist <= 1.0, (dist <= 1.0) & (dist > (1 - 1.5 / min(ry, rx)) ** 2)
        labels[inside] = label
        labels[ring] = 0  # unlabeled outline, ignored under reduce-zero-label
    img = np.zeros((h, w, 3), np.float32)
    for label in np.unique(labels):
        mask = labels == label
        if label == 0:  # outlines: a dark line
            img[mask] = 40
        else:
            img[mask] = _texture(int(label), h, w, rng)[mask]
    return np.clip(img, 0, 255).astype(np.uint8), labels


def write_synthetic_ade20k(out_dir: str, num_train: int = 200, num_val: int = 40, size: int = 168, seed: int = 0,
                           overwrite: bool = False) -> str:
    """Write the dataset to ``out_dir`` atomically (built beside it, then renamed); returns ``out_dir``.

    An existing ``out_dir`` is an error unless ``overwrite`` is set.
    """
    out_dir = osp.abspath(out_dir)
    if osp.exists(out_dir) and not overwrite:  # before any work (atomic_dir checks again at the end)
        raise FileExistsError(f'{out_dir} already exists; pass overwrite=True (--overwrite) to replace it')
    if num_train < 1 or num_val < 1 or size < 28:
        raise ValueError(f'need num_train >= 1, num_val >= 1, size >= 28; got {num_train}, {num_val}, {size}')
    with atomic_dir(out_dir, overwrite) as staging_path:
        staging = str(staging_path)
        for split, count in zip(SPLITS, (num_train, num_val)):
            os.makedirs(osp.join(staging, 'images', split))
            os.makedirs(osp.join(staging, 'annotations', split))
            for i in range(count):
                img, labels = make_sample(seed, split, i, size)
                stem = f'synth_{split}_{i:05d}'
                Image.fromarray(img).save(osp.join(staging, 'images', split, stem + '.jpg'), quality=95)
                Image.fromarray(labels).save(osp.join(staging, 'annotations', split, stem + '.png'))
        with open(osp.join(staging, 'dataset.json'), 'w') as f:
            json.dump(dict(classes=CLASSES, palette=PALETTE, label_values='0 = unlabeled (ignored), 1..5 = classes',
                           num_train=num_train, num_val=num_val, size=size, seed=seed), f, indent=1)
    return out_dir
