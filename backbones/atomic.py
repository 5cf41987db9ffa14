"""Atomic writes, the project's one implementation: a result appears under its final name only once complete.

``atomic_file`` (an open file) and ``atomic_path`` (a path, for writers that take a file name: ``torch.save``,
safetensors, numpy) write a temporary file in the target's folder, flush it to disk (fsync) and rename it over
the target, so a crash or a full disk leaves the previous file intact and never a truncated one; ``atomic_write``
writes bytes or text that way, ``json_dump`` JSON. ``atomic_dir`` is the directory variant: a temporary directory
beside the target, renamed into place once complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ['atomic_file', 'atomic_path', 'atomic_write', 'atomic_dir', 'json_dump']


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; once the block has written it, it replaces ``path``."""
    target = Path(path)
    _refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f'.{target.name}.', suffix='.tmp', dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result is an ordinary file
        _refuse_existing(target, overwrite)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = 'w', *, overwrite: bool = True, **open_kwargs) -> Iterator[IO]:
    """``open(path, mode)`` on a temporary file that replaces ``path`` when the block ends without an error."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f


def atomic_write(path: str | os.PathLike, data: bytes | str, *, overwrite: bool = True) -> None:
    with atomic_file(path, 'wb' if isinstance(data, bytes) else 'w', overwrite=overwrite) as f:
        f.write(data)


def json_dump(obj: Any, path: str | os.PathLike, **dump_kwargs) -> None:
    """JSON (default: indented, UTF-8) written atomically."""
    dump_kwargs = {'indent': 2, 'ensure_ascii': False, **dump_kwargs}
    atomic_write(path, json.dumps(obj, **dump_kwargs) + '\n')


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory next to ``out_dir``; it becomes ``out_dir`` only once complete."""
    out = Path(out_dir).expanduser().absolute()
    _refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
        _refuse_existing(out, overwrite)
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f'.{out.name}.old-', dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f'{out} already exists; pass overwrite=True (--overwrite) to replace it')
