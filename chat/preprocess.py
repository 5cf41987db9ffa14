"""Image preprocessing of InternVL-Chat: 448px tiles with ImageNet normalization, optionally dynamic resolution.

* Fixed resolution (V1-2): the image is resized to ``tile_size`` x ``tile_size`` (bicubic, aspect ratio not kept)
  and normalized with the ImageNet mean and std: one tile.
* Dynamic resolution (V1-5 and later): a grid of ``cols`` x ``rows`` tiles with ``min_tiles <= cols*rows <=
  max_tiles`` is chosen whose aspect ratio ``cols/rows`` is closest to the image's ``width/height``; the image is
  resized to ``cols*tile_size`` x ``rows*tile_size`` and cut into tiles in row-major order (left to right, top to
  bottom). When two grids are equally close, the larger one wins if the image has more than half the pixels of
  that grid. With ``use_thumbnail`` and more than one tile, a ``tile_size`` thumbnail of the whole image is
  appended. Each tile gives ``num_image_token`` tokens, so the tile count sets the prompt length.
"""
from __future__ import annotations

import io
import os
import random
from typing import Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from backbones.internvit import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (re-exported)


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every ``(cols, rows)`` with ``min_tiles <= cols*rows <= max_tiles``, fewest tiles first.

    Grids with the same number of tiles come in the published order: the order in which CPython iterates a set
    filled for n = min..max, cols = 1..n, rows = 1..n (deterministic for integer tuples), sorted stably by tile
    count. That order decides between equally close grids (e.g. 2x3 and 3x2 for a 13:12 image when
    ``min_tiles > 1``), so it is kept as it is.
    """
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f'need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}')
    grids = {(c, r) for n in range(min_tiles, max_tiles + 1) for c in range(1, n + 1) for r in range(1, n + 1)
             if min_tiles <= c * r <= max_tiles}
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(width: int, height: int, tile_size: int = 448, min_tiles: int = 1,
                max_tiles: int = 6) -> tuple[int, int]:
    """The ``(cols, rows)`` tile grid for an image of ``width`` x ``height`` pixels (see the module docstring)."""
    if width <= 0 or height <= 0:
        raise ValueError(f'image size must be positive, got {width}x{height}')
    aspect = width / height
    best, best_diff = (1, 1), float('inf')
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_tiles(image: Image.Image, tile_size: int = 448, min_tiles: int = 1, max_tiles: int = 6,
                  use_thumbnail: bool = True) -> list[Image.Image]:
    """The image cut into tiles of ``tile_size`` (plus a thumbnail when there is more than one tile)."""
    cols, rows = choose_grid(image.width, image.height, tile_size, min_tiles, max_tiles)
    resized = image.resize((cols * tile_size, rows * tile_size), Image.BICUBIC)
    tiles = [resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
             for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.BICUBIC))
    return tiles


def tile_to_tensor(tile: Image.Image, tile_size: int = 448) -> torch.Tensor:
    """One tile: RGB, resized to ``tile_size`` square (bicubic), ``[3, s, s]`` float normalized with ImageNet stats."""
    tile = tile.convert('RGB')
    if tile.size != (tile_size, tile_size):
        tile = TF.resize(tile, [tile_size, tile_size], interpolation=InterpolationMode.BICUBIC)
    return TF.normalize(TF.to_tensor(tile), IMAGENET_MEAN, IMAGENET_STD)


def open_image(path: str | os.PathLike) -> Image.Image:
    """An image file as RGB; errors name the file."""
    try:
        with Image.open(path) as img:
            return img.convert('RGB')
    except FileNotFoundError:
        raise FileNotFoundError(f'image {path} does not exist') from None
    except OSError as err:
        raise OSError(f'cannot read image {path}: {err}') from None


def jpeg_degrade(image: Image.Image, rng: random.Random | None = None) -> Image.Image:
    """The published training augmentation (a meta-file dataset with ``data_augment``): re-encode as JPEG at a
    quality drawn uniformly from 75..100."""
    quality = (rng or random).randint(75, 100)
    buffer = io.BytesIO()
    image.convert('RGB').save(buffer, format='JPEG', quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as degraded:
        return degraded.convert('RGB')


def load_image(image: str | os.PathLike | Image.Image, tile_size: int = 448, dynamic: bool = False,
               min_tiles: int = 1, max_tiles: int = 6, use_thumbnail: bool = True,
               augment: bool = False) -> torch.Tensor:
    """``pixel_values`` ``[T, 3, tile_size, tile_size]`` for one image: T=1 at fixed resolution.
    ``augment``: each tile gets ``jpeg_degrade`` (as the published training transform)."""
    img = image.convert('RGB') if isinstance(image, Image.Image) else open_image(image)
    tiles = dynamic_tiles(img, tile_size, min_tiles, max_tiles, use_thumbnail) if dynamic else [img]
    if augment:
        tiles = [jpeg_degrade(t) for t in tiles]
    return torch.stack([tile_to_tensor(t, tile_size) for t in tiles])


def count_tiles(size: Sequence[int], dynamic: bool, tile_size: int = 448, min_tiles: int = 1,
                max_tiles: int = 6, use_thumbnail: bool = True) -> int:
    """How many tiles ``load_image`` makes for an image of ``size = (width, height)``, without decoding it."""
    if not dynamic:
        return 1
    cols, rows = choose_grid(int(size[0]), int(size[1]), tile_size, min_tiles, max_tiles)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n
