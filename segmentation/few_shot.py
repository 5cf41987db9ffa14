"""Write ADE20K few-shot split files (1/16, 1/8, 1/4, 1/2, 1/1) that pin the subsets of ``CheckedADE20KDataset``.

    python -m segmentation.few_shot data/ade/ADEChallengeData2016/images/training --out-dir data/ade/splits

writes ``train_1of16.txt`` ... ``train_1of1.txt``, one image name (path relative to the image folder, no suffix)
per line, in ranking order. A config can then use ``ann_file='.../train_1of16.txt'`` instead of ``fraction=1/16``;
both give the same images (see ``segmentation.datasets`` for the ranking).
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
from fractions import Fraction
from typing import Iterable, List

from backbones.atomic import atomic_write

from .datasets import few_shot_subset

FRACTIONS = (Fraction(1, 16), Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), Fraction(1, 1))


def list_image_stems(img_dir: str, suffix: str = '.jpg') -> List[str]:
    if not osp.isdir(img_dir):
        raise FileNotFoundError(f'image folder {img_dir} does not exist')
    stems = []
    for root, _, files in os.walk(img_dir):
        for name in files:
            if name.endswith(suffix):
                stems.append(osp.relpath(osp.join(root, name), img_dir)[:-len(suffix)])
    if not stems:
        raise FileNotFoundError(f'no images ending in {suffix} in {img_dir}')
    return sorted(stems)


def write_split_files(stems: Iterable[str], out_dir: str, seed: int = 0, fractions=FRACTIONS,
                      overwrite: bool = False) -> List[str]:
    stems = list(stems)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for fraction in fractions:
        path = osp.join(out_dir, f'train_{fraction.numerator}of{fraction.denominator}.txt')
        if osp.exists(path) and not overwrite:
            raise FileExistsError(f'{path} exists; pass --overwrite to replace it')
        subset = few_shot_subset(stems, float(fraction), seed)
        atomic_write(path, '\n'.join(subset) + '\n')
        paths.append(path)
        print(f'{path}: {len(subset)} of {len(stems)} images')
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('img_dir', help='training image folder, e.g. .../ADEChallengeData2016/images/training')
    parser.add_argument('--out-dir', required=True)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--suffix', default='.jpg')
    parser.add_argument('--overwrite', action='store_true')
    args = parser.parse_args(argv)
    write_split_files(list_image_stems(args.img_dir, args.suffix), args.out_dir, args.seed, overwrite=args.overwrite)
    return 0


if __name__ == '__main__':
    sys.exit(main())
