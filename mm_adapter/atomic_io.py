"""Atomic local writes for MMEngine: checkpoints and the ``last_checkpoint`` pointer are never left half-written.

MMEngine writes checkpoints through its file backend (``fileio.put``), whose local backend opens the target and
writes in place: a crash or a full disk mid-write leaves a truncated ``iter_N.pth`` that ``--resume`` then picks.
:class:`AtomicLocalBackend` writes to a temporary file in the same folder, flushes it to disk and renames it over
the target (``os.replace``, atomic on POSIX). It replaces MMEngine's ``'local'`` backend (the one used for paths
without a ``scheme://`` prefix) when a run is built (``mm_adapter.runtime.build_runner``); reads are unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from mmengine.fileio import LocalBackend, register_backend
from mmengine.fileio import io as fileio_module

from backbones.atomic import atomic_write


class AtomicLocalBackend(LocalBackend):
    """``LocalBackend`` whose ``put``/``put_text`` write a temporary file and rename it over the target."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        atomic_write(filepath, obj)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = 'utf-8') -> None:
        self.put(obj.encode(encoding), filepath)


def install_atomic_local_backend() -> None:
    """Make ``AtomicLocalBackend`` MMEngine's backend for local paths (idempotent)."""
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')
    # get_file_backend caches instances: drop cached plain local backends so new look-ups get the atomic one
    for key in [k for k, v in fileio_module.backend_instances.items() if type(v) is LocalBackend]:
        del fileio_module.backend_instances[key]
