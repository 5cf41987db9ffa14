"""Identity of a frozen backbone: a sha256 of its weights, cheap to recompute thanks to a per-file cache.

The hash covers the model's state dict in its own key order: for each tensor its name, its shape and its values
as little-endian float32 bytes. Float32 makes it independent of the compute dtype for the usual bf16 checkpoints
(a bf16 model and a float32 model loaded from the same bf16 file hash alike, being exactly the same numbers) and
independent of the file layout (HF, original .pth, sharded safetensors of the same weights hash alike).

Hashing InternViT-6B reads 24 GB of float32 (tens of seconds), so the result is cached in
``$INTERNVIT_CACHE_DIR/backbone_sha256.json`` (default ``~/.cache/internvit``), keyed by the weights path's real
path, size and modification time, the architecture and the compute dtype. A backbone without a weights file
(random init, tests) is hashed every time; it is small in practice.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from backbones.atomic import json_dump


def cache_path() -> Path:
    root = os.environ.get('INTERNVIT_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'internvit')
    return Path(root) / 'backbone_sha256.json'


def weights_sha256(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        values = tensor.detach().to('cpu', torch.float32).contiguous()
        digest.update(f'{name}\0{tuple(values.shape)}\0'.encode())
        digest.update(memoryview(values.numpy()).cast('B'))
    return digest.hexdigest()


def _file_fingerprint(path: str) -> str | None:
    """realpath + size + mtime of a weights file, or of every file directly inside a weights directory."""
    real = os.path.realpath(path)
    if os.path.isfile(real):
        st = os.stat(real)
        return f'{real}|{st.st_size}|{st.st_mtime_ns}'
    if os.path.isdir(real):
        entries = []
        for entry in sorted(os.scandir(real), key=lambda e: e.name):
            if entry.is_file():
                st = entry.stat()
                entries.append(f'{entry.name}:{st.st_size}:{st.st_mtime_ns}')
        return f'{real}|' + ','.join(entries)
    return None


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a missing or unreadable cache only costs a re-hash


def _write_cache(path: Path, cache: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        json_dump(cache, path, indent=1, sort_keys=True, ensure_ascii=True)  # concurrent ranks: each file complete
    except OSError:
        pass  # read-only home: hashing still works, just uncached


def backbone_identity(backbone: nn.Module) -> dict:
    """``dict(sha256, pretrained, arch, dtype)`` for an InternViT (or any module with the same attributes)."""
    pretrained = getattr(backbone, 'pretrained', None)
    arch = getattr(backbone, 'arch', None)
    arch_dict = asdict(arch) if arch is not None else None
    dtype = str(getattr(backbone, 'compute_dtype', None))
    fingerprint = _file_fingerprint(str(pretrained)) if pretrained else None
    key = None
    if fingerprint is not None:
        key = f'{fingerprint}|{json.dumps(arch_dict, sort_keys=True)}|{dtype}'
        cached = _read_cache(cache_path()).get(key)
        if cached:
            return dict(sha256=cached, pretrained=str(pretrained), arch=arch_dict, dtype=dtype)
    sha = weights_sha256(backbone)
    if key is not None:
        cache = _read_cache(cache_path())
        cache[key] = sha
        _write_cache(cache_path(), cache)
    return dict(sha256=sha, pretrained=None if pretrained is None else str(pretrained), arch=arch_dict, dtype=dtype)
