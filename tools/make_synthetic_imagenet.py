"""Write a small synthetic ImageNet in the standard layouts, with classes a linear probe can learn.

    python tools/make_synthetic_imagenet.py data/synthetic_imagenet --classes 10 --train-per-class 40

Layout written under OUT (the same as the real datasets, so the configs only change their roots):

    classes.txt                      one WordNet-style id per line (the IN-1K class list)
    train/<wnid>/<wnid>_<k>.JPEG     IN-1K train
    val/<wnid>/ILSVRC2012_val_<n>.JPEG   IN-1K val (numbered in shuffled order, as the real val set)
    real.json                        ReaL-style labels per val number: mostly [own class], some with a second
                                     class, some [] (unlabeled)
    meta/train.txt, meta/val.txt     file lists "<relative path> <label>"
    imagenetv2/<class index>/*.jpeg  ImageNet-V2 matched-frequency layout
    sketch/<wnid>/*.JPEG             ImageNet-Sketch layout (desaturated)
    imagenet-a/<wnid>/*.jpg          ImageNet-A layout, a subset of the classes (noisier)
    imagenet-r/<wnid>/*.jpg          ImageNet-R layout, the same subset (other stripe frequency)

Each class is a colour plus an oriented stripe pattern under noise: linearly separable from the features of
even a randomly initialised ViT. The directory is written beside OUT and renamed into place when complete; an
existing OUT is refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_wnids(num_classes: int) -> list[str]:
    # Sorted like real WordNet ids, so the class index is the position in the sorted list.
    return [f'n{10000000 + 7919 * c:08d}' for c in range(num_classes)]


class ClassStyle:
    """The look of every class: a colour and a stripe orientation, spread apart so classes stay separable."""

    def __init__(self, num_classes: int, seed: int):
        rng = np.random.default_rng(seed)
        hues = (np.arange(num_classes) * 0.618034 + rng.uniform()) % 1.0
        self.colors = np.stack([_hsv_to_rgb(h, 0.65 + 0.3 * ((c * 7) % 3) / 2, 0.55 + 0.4 * ((c * 5) % 4) / 3)
                                for c, h in enumerate(hues)]) * 255.0
        self.angles = rng.uniform(0, np.pi, size=num_classes)

    def image(self, label: int, size: int, rng: np.random.Generator, noise: float = 18.0, frequency: float = 0.35,
              saturation: float = 1.0) -> Image.Image:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        angle = self.angles[label] + rng.normal(0, 0.1)
        stripes = np.sin(frequency * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
        color = self.colors[label] + rng.normal(0, 8, size=3)
        pixels = color[None, None, :] + 35.0 * stripes[..., None] + rng.normal(0, noise, size=(size, size, 3))
        if saturation != 1.0:
            gray = pixels.mean(-1, keepdims=True)
            pixels = gray + saturation * (pixels - gray)
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def write_dataset(out: Path, *, classes: int, train_per_class: int, val_per_class: int, variant_per_class: int,
                  subset_classes: int, size: int, seed: int) -> dict:
    wnids = synthetic_wnids(classes)
    style = ClassStyle(classes, seed)
    rng = np.random.default_rng(seed + 1)
    (out / 'meta').mkdir(parents=True)
    (out / 'classes.txt').write_text(''.join(f'{w} synthetic class {i}\n' for i, w in enumerate(wnids)))

    train_lines = []
    for label, wnid in enumerate(wnids):
        (out / 'train' / wnid).mkdir(parents=True)
        for k in range(train_per_class):
            rel = f'train/{wnid}/{wnid}_{k:04d}.JPEG'
            style.image(label, size, rng).save(out / rel, quality=92)
            train_lines.append(f'{rel} {label}\n')
    (out / 'meta' / 'train.txt').write_text(''.join(train_lines))

    val_labels = np.repeat(np.arange(classes), val_per_class)
    rng.shuffle(val_labels)  # val numbers are not grouped by class, as in the real val set
    real, val_lines = [], []
    for number, label in enumerate(val_labels, start=1):
        wnid = wnids[label]
        (out / 'val' / wnid).mkdir(parents=True, exist_ok=True)
        rel = f'val/{wnid}/ILSVRC2012_val_{number:08d}.JPEG'
        style.image(int(label), size, rng).save(out / rel, quality=92)
        val_lines.append(f'{rel} {label}\n')
        if number % 5 == 0:
            real.append([])  # unlabeled in ReaL
        elif number % 7 == 0:
            real.append(sorted({int(label), int((label + 1) % classes)}))  # a second plausible class
        else:
            real.append([int(label)])
    (out / 'meta' / 'val.txt').write_text(''.join(val_lines))
    (out / 'real.json').write_text(json.dumps(real))

    for label, wnid in enumerate(wnids):
        for k in range(variant_per_class):
            (out / 'imagenetv2' / str(label)).mkdir(parents=True, exist_ok=True)
            style.image(label, size, rng).save(out / 'imagenetv2' / str(label) / f'{k:04d}.jpeg', quality=92)
            (out / 'sketch' / wnid).mkdir(parents=True, exist_ok=True)
            style.image(label, size, rng, saturation=0.6).save(out / 'sketch' / wnid / f'sketch_{k:04d}.JPEG')
    subset = sorted(np.random.default_rng(seed + 2).choice(classes, size=subset_classes, replace=False).tolist())
    for label in subset:
        wnid = wnids[label]
        for k in range(variant_per_class):
            (out / 'imagenet-a' / wnid).mkdir(parents=True, exist_ok=True)
            style.image(label, size, rng, noise=30.0).save(out / 'imagenet-a' / wnid / f'a_{k:04d}.jpg', quality=92)
            (out / 'imagenet-r' / wnid).mkdir(parents=True, exist_ok=True)
            style.image(label, size, rng, frequency=0.5).save(out / 'imagenet-r' / wnid / f'r_{k:04d}.jpg',
                                                              quality=92)
    return dict(classes=classes, train=len(train_lines), val=len(val_lines), subset_classes=subset,
                real_unlabeled=sum(1 for r in real if not r))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('out', help='output directory')
    parser.add_argument('--classes', type=int, default=10)
    parser.add_argument('--train-per-class', type=int, default=40)
    parser.add_argument('--val-per-class', type=int, default=10)
    parser.add_argument('--variant-per-class', type=int, default=4, help='images per class in V2/Sketch/A/R')
    parser.add_argument('--subset-classes', type=int, default=None,
                        help='classes in the A/R subsets (default: 200 of 1000, i.e. a fifth, at least 2)')
    parser.add_argument('--size', type=int, default=64, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--overwrite', action='store_true', help='replace an existing OUT')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.classes < 2 or args.train_per_class < 2 or args.val_per_class < 1:
        sys.exit('need --classes >= 2, --train-per-class >= 2 and --val-per-class >= 1')
    subset = args.subset_classes or max(2, round(args.classes / 5))
    if not 1 <= subset <= args.classes:
        sys.exit(f'--subset-classes must be within 1..{args.classes}, got {subset}')
    if out.exists() and not args.overwrite:
        sys.exit(f'{out} exists; pass --overwrite to replace it')
    from backbones.atomic import atomic_dir
    with atomic_dir(out, args.overwrite) as tmp:
        summary = write_dataset(tmp, classes=args.classes, train_per_class=args.train_per_class,
                                val_per_class=args.val_per_class, variant_per_class=args.variant_per_class,
                                subset_classes=subset, size=args.size, seed=args.seed)
    print(f'wrote {out}: {json.dumps(summary)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
