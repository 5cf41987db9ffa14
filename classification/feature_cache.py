"""Feature cache for probes without augmentation: backbone summaries extracted once, heads trained from disk.

Layout of a cache directory::

    manifest.json          what the features are of (compared field by field on every use)
    shard_00000.npy        float32 (or float16) [n, L, 2, C]: cls and patch-mean of the last L layers
    shard_00000.done       written after its shard file is complete (json: count, seconds, sha256 of the shard)

Shards hold ``shard_size`` consecutive dataset indices; the unfinished ones are spread over ranks round-robin
(so a resumed extraction is shared evenly too); each rank writes
its shards through a memory map into a temporary file that is renamed when complete, then drops a done marker.
An interrupted extraction resumes with the shards that have no marker. A manifest that differs from the current
backbone (weights sha256, architecture, compute dtype), resolution, transform, normalization, dataset file list
or storage settings is refused with the differing fields named; the dataset's fingerprint covers every image
file's path, label, size and modification time, so replaced images make the cache stale too. Delete the directory
(or point ``cache_dir`` elsewhere) to re-extract. A directory that holds shards but no manifest is refused (the
manifest is never written over shards of unknown origin). Each shard's sha256 is recorded in its done marker and
checked when the shard is first read; a truncated or altered shard is an error naming the file. All ranks must see
the same directory (a shared filesystem on multi-node runs).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from mmengine.dist import barrier, get_dist_info
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import DATASETS
from mmengine.utils import ProgressBar
from torch.utils.data import DataLoader, Dataset, Subset

from backbones.atomic import json_dump

from .datasets import probe_collate
from .transforms import describe_pipeline

CACHE_FORMAT = 'internvit-feature-cache/1'
STORAGE_DTYPES = ('float32', 'float16')


class StaleFeatureCacheError(RuntimeError):
    """The cache on disk was made for other features than the ones asked for."""


def _write_json_atomic(path: Path, obj) -> None:
    json_dump(obj, path, indent=1, sort_keys=True, ensure_ascii=True)


def manifest_differences(cached: dict, expected: dict) -> list[str]:
    """``field: cached=..., now=...`` for every compared field that differs (``info`` is not compared)."""
    diffs = []
    for key in sorted((set(cached) | set(expected)) - {'info'}):
        a, b = cached.get(key, '<absent>'), expected.get(key, '<absent>')
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f'{key}.{d}' for d in manifest_differences(a, b)]
        elif a != b:
            diffs.append(f'{key}: cached={a!r}, now={b!r}')
    return diffs


@DATASETS.register_module()
class CachedFeatures(Dataset):
    """A dataset of backbone summaries read from a feature cache of ``dataset`` (built from its config).

    Args:
        dataset: the image dataset; its pipeline must be deterministic (no augmentation).
        cache_dir: the cache directory (created when missing).
        layers: how many last layers to store; None: what the model's heads need.
        dtype: storage dtype, ``'float32'`` (default) or ``'float16'`` (half the disk; refused if it overflows).
        shard_size: images per shard (the unit of resumption).
        extract_batch_size / extract_num_workers: the extraction DataLoader.
    ``FeatureCacheHook`` (or ``prepare(model)``) extracts or validates the cache before it is read.
    """

    def __init__(self, dataset, cache_dir: str, layers: int | None = None, dtype: str = 'float32',
                 shard_size: int = 4096, extract_batch_size: int = 64, extract_num_workers: int = 4):
        self.dataset = DATASETS.build(dataset) if isinstance(dataset, dict) else dataset
        if not getattr(getattr(self.dataset, 'pipeline', None), 'deterministic', False):
            raise ValueError(f'CachedFeatures needs a deterministic pipeline (no augmentation), got '
                             f'{describe_pipeline(getattr(self.dataset, "pipeline", None))}; with augmentation, '
                             f'train on images (features on the fly)')
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f'feature cache dtype must be one of {STORAGE_DTYPES}, got {dtype!r}')
        if shard_size < 1:
            raise ValueError(f'shard_size must be >= 1, got {shard_size}')
        self.cache_dir = Path(cache_dir)
        self.layers, self.dtype, self.shard_size = layers, dtype, int(shard_size)
        self.extract_batch_size, self.extract_num_workers = extract_batch_size, extract_num_workers
        self.labels = np.asarray(self.dataset.labels)
        self._shards: dict[int, np.ndarray] = {}

    @property
    def metainfo(self) -> dict:
        return self.dataset.metainfo

    @property
    def num_shards(self) -> int:
        return (len(self.dataset) + self.shard_size - 1) // self.shard_size

    def __len__(self) -> int:
        return len(self.dataset)

    def _shard_path(self, shard: int) -> Path:
        return self.cache_dir / f'shard_{shard:05d}.npy'

    def _done_path(self, shard: int) -> Path:
        return self.cache_dir / f'shard_{shard:05d}.done'

    def _is_done(self, shard: int) -> bool:
        return self._done_path(shard).is_file() and self._shard_path(shard).is_file()

    # ------------------------------------------------------------------------------------------------- manifest
    def expected_manifest(self, model) -> dict:
        identity = model.backbone_identity()
        layers = self.layers or model.summary_layers
        if layers < model.summary_layers:
            raise ValueError(f'the heads need the last {model.summary_layers} layers, but the cache stores {layers}')
        pipeline = self.dataset.pipeline
        return dict(
            format=CACHE_FORMAT,
            backbone=dict(sha256=identity['sha256'], arch=identity['arch'], dtype=identity['dtype']),
            resolution=getattr(pipeline, 'size', None),
            transform=describe_pipeline(pipeline),
            normalization=model.data_preprocessor.describe(),
            dataset={k: v for k, v in self.dataset.describe().items() if k != 'transform'},
            layers=int(layers), dtype=self.dtype, shard_size=self.shard_size, num_shards=self.num_shards,
            embed_dim=int(model.backbone.embed_dim),
            info=dict(backbone_pretrained=identity['pretrained'], created=time.strftime('%Y-%m-%d %H:%M:%S')))

    def _check_manifest(self, expected: dict) -> None:
        cached = json.loads((self.cache_dir / 'manifest.json').read_text())
        diffs = manifest_differences(cached, expected)
        if diffs:
            raise StaleFeatureCacheError(
                f'feature cache {self.cache_dir} was made for other features; refusing to reuse it. Differences:\n  '
                + '\n  '.join(diffs) + f'\nDelete {self.cache_dir} or set another cache_dir to extract again.')

    # ------------------------------------------------------------------------------------------------- extraction
    def prepare(self, model) -> int:
        """Validate the manifest (writing it if new) and extract this rank's missing shards; every rank returns
        after all shards exist. Returns the number of images this rank pushed through the backbone."""
        model = model.module if is_model_wrapper(model) else model
        if model.needs_tokens:
            raise ValueError(f'feature cache {self.cache_dir}: the attention-pooling head reads the token sequence, '
                             f'which the cache (summaries only) does not hold; train it on images')
        rank, world = get_dist_info()
        expected = self.expected_manifest(model)
        manifest = self.cache_dir / 'manifest.json'
        if rank == 0:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            if not manifest.is_file():
                leftovers = sorted(p.name for p in self.cache_dir.glob('shard_*'))
                if leftovers:
                    raise StaleFeatureCacheError(
                        f'feature cache {self.cache_dir} holds shards ({", ".join(leftovers[:3])}, ...) but no '
                        f'manifest.json, so what they were extracted from is unknown; refusing to write a manifest '
                        f'over them. Delete {self.cache_dir} or set another cache_dir to extract again.')
                _write_json_atomic(manifest, expected)
        barrier()
        self._check_manifest(expected)
        self._layers = expected['layers']
        # Every rank lists the unfinished shards before any rank starts on them (so all see the same list), then
        # takes every world-th of that list: a resumed extraction stays balanced, no rank idles at the barrier.
        missing = [s for s in range(self.num_shards) if not self._is_done(s)]
        barrier()
        todo = missing[rank::world]
        extracted = 0
        if todo:
            print_log(f'feature cache {self.cache_dir}: rank {rank} extracts {len(todo)} of {self.num_shards} shards',
                      logger='current')
        # Rank 0 shows its images done with an ETA (MMEngine's bar, on the current stdout: its default is the one
        # at import time); the other ranks stay quiet.
        todo_images = sum(min(self.shard_size, len(self.dataset) - s * self.shard_size) for s in todo)
        progress = ProgressBar(todo_images, file=sys.stdout) if todo and rank == 0 else None
        was_training = model.training
        model.eval()
        try:
            for shard in todo:
                extracted += self._extract_shard(model, shard, progress)
        finally:
            model.train(was_training)
        barrier()
        missing = [s for s in range(self.num_shards) if not self._is_done(s)]
        if missing:
            raise RuntimeError(f'feature cache {self.cache_dir}: shards {missing[:5]} are still missing after '
                               f'extraction; does every rank see the same directory?')
        return extracted

    @torch.no_grad()
    def _extract_shard(self, model, shard: int, progress: ProgressBar | None = None) -> int:
        start = time.time()
        first = shard * self.shard_size
        indices = range(first, min(first + self.shard_size, len(self.dataset)))
        loader = DataLoader(Subset(self.dataset, indices), batch_size=self.extract_batch_size, shuffle=False,
                            num_workers=self.extract_num_workers, collate_fn=probe_collate)
        shape = (len(indices), self._layers, 2, int(model.backbone.embed_dim))
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f'.shard_{shard:05d}.', suffix='.npy')
        os.close(fd)
        try:
            out = np.lib.format.open_memmap(tmp, mode='w+', dtype=self.dtype, shape=shape)
            row = 0
            for batch in loader:
                data = model.data_preprocessor(batch, False)
                summaries = model.summaries(data['inputs'])[:, -self._layers:]
                values = summaries.cpu().numpy().astype(self.dtype)
                if self.dtype == 'float16' and not np.isfinite(values).all():
                    raise OverflowError(f'feature cache {self.cache_dir}: features overflow float16 in shard {shard}; '
                                        f"use dtype='float32'")
                out[row:row + len(values)] = values
                row += len(values)
                if progress is not None:
                    progress.update(len(values))
            out.flush()
            del out
            os.replace(tmp, self._shard_path(shard))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _write_json_atomic(self._done_path(shard), dict(count=len(indices), seconds=round(time.time() - start, 3),
                                                        sha256=_file_sha256(self._shard_path(shard))))
        if progress is not None:
            progress.file.write('\n')  # the bar's line ends before the log line
        print_log(f'feature cache {self.cache_dir}: shard {shard} ({len(indices)} images) in '
                  f'{time.time() - start:.1f} s', logger='current')
        return len(indices)

    # ------------------------------------------------------------------------------------------------- reading
    def __getstate__(self):
        state = dict(self.__dict__)
        state['_shards'] = {}  # memory maps are reopened in each worker, never pickled as arrays
        return state

    def _shard(self, shard: int) -> np.ndarray:
        array = self._shards.get(shard)
        if array is None:
            if not self._is_done(shard):
                raise RuntimeError(f'feature cache {self.cache_dir}: shard {shard} has not been extracted; add '
                                   f"dict(type='FeatureCacheHook') to custom_hooks so it is prepared before use")
            array = self._shards[shard] = self._open_verified(shard)
        return array

    def _open_verified(self, shard: int) -> np.ndarray:
        """The shard's memory map, after its sha256 matched its done marker's and its shape the manifest's."""
        path = self._shard_path(shard)
        try:
            recorded = json.loads(self._done_path(shard).read_text()).get('sha256')
        except (OSError, ValueError) as err:
            raise StaleFeatureCacheError(f'feature cache shard marker {self._done_path(shard)} is unreadable: '
                                         f'{err}') from None
        if recorded is None:
            raise StaleFeatureCacheError(f'feature cache shard {path} has no recorded checksum (made by an older '
                                         f'version); delete {self.cache_dir} to extract again')
        actual = _file_sha256(path)
        if actual != recorded:
            raise StaleFeatureCacheError(f'feature cache shard {path} is truncated or altered: sha256 {actual} '
                                         f'differs from the recorded {recorded}; delete it and its .done marker '
                                         f'to extract it again')
        try:
            array = np.load(path, mmap_mode='r')
        except (ValueError, OSError) as err:
            raise StaleFeatureCacheError(f'feature cache shard {path} cannot be read: {err}') from None
        first = shard * self.shard_size
        rows = min(self.shard_size, len(self.dataset) - first)
        if array.shape[0] != rows:
            raise StaleFeatureCacheError(f'feature cache shard {path} holds {array.shape[0]} rows, expected {rows}')
        return array

    def __getitem__(self, index: int) -> dict:
        row = np.array(self._shard(index // self.shard_size)[index % self.shard_size], dtype=np.float32)
        real = getattr(self.dataset, 'real_labels', None)
        return dict(inputs=torch.from_numpy(row), label=int(self.labels[index]), index=index,
                    real_labels=None if real is None else real[index], input_kind='summaries')


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            digest.update(block)
    return digest.hexdigest()


def prepare_feature_caches(dataset, model) -> int:
    """Prepare every ``CachedFeatures`` inside ``dataset`` (through ``.dataset`` / ``.datasets`` wrappers)."""
    if isinstance(dataset, CachedFeatures):
        return dataset.prepare(model)
    total = 0
    for child in getattr(dataset, 'datasets', None) or []:
        total += prepare_feature_caches(child, model)
    inner = getattr(dataset, 'dataset', None)
    if inner is not None:
        total += prepare_feature_caches(inner, model)
    return total
