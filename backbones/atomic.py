"""Atomic writes, the project's one implementation: a result appears under its final name only once complete.

``atomic_file`` (an open file) and ``atomic_path`` (a path, for writers that take a file name: ``torch.save``,
safetensors, numpy) write a temporary file in the target's folder, flush it to disk (fsync) and rename it over
the target, so a crash or a full disk leaves the previous file intact and never a truncated one; ``atomic_write``
writes bytes or text that way, ``json_dump`` JSON. ``atomic_dir`` is the directory variant: a temporary directory
beside the target, renamed into place once complete; with ``overwrite`` it replaces only a previous output of
``atomic_dir`` (marked with ``EXPORT_MARKER``) and never a directory holding the files being exported.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

__all__ = ['atomic_file', 'atomic_path', 'atomic_write', 'atomic_dir', 'json_dump', 'check_replaceable',
           'recover_interrupted_replace', 'EXPORT_MARKER']


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


# Every directory written through atomic_dir holds this marker; overwrite=True replaces only such a directory, so
# "--overwrite" can never delete a run directory, a dataset or any other folder this code did not write.
EXPORT_MARKER = '.internvit_export'


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool, sources: Iterable[str | os.PathLike] = ()
               ) -> Iterator[Path]:
    """Yield a temporary directory next to ``out_dir``; it becomes ``out_dir`` only once complete.

    ``overwrite`` replaces an existing ``out_dir`` only if it is a previous output (it holds ``EXPORT_MARKER``)
    and contains none of ``sources``. The old directory is moved aside, the new one renamed in, then the old one
    deleted; a crash between the two renames is repaired by the next call for the same ``out_dir``.
    """
    out = Path(out_dir).expanduser().absolute()
    sources = list(sources)
    check_replaceable(out, overwrite, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
    try:
        yield tmp
        (tmp / EXPORT_MARKER).write_text(json.dumps({'written_by': 'backbones.atomic.atomic_dir',
                                                     'time': time.strftime('%Y-%m-%dT%H:%M:%S%z')}) + '\n')
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
        check_replaceable(out, overwrite, sources)
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f'.{out.name}.old-', dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)  # a crash before this line leaves out in old/: recover_interrupted_replace
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_interrupted_replace(out: str | os.PathLike) -> None:
    """Repair what a crash inside ``atomic_dir``'s replacement left: put a moved-aside ``out`` back if ``out`` is
    missing, delete moved-aside copies that were already replaced."""
    out = Path(out).expanduser().absolute()
    if not out.parent.is_dir():
        return
    for old in sorted(out.parent.glob(f'.{glob.escape(out.name)}.old-*')):
        kept = old / out.name
        if not (old.is_dir() and (kept.exists() or kept.is_symlink())):
            continue
        if not (out.exists() or out.is_symlink()):
            os.rename(kept, out)
            logging.getLogger(__name__).warning('%s was missing after an interrupted replacement; restored the '
                                                'previous one from %s', out, old)
        shutil.rmtree(old, ignore_errors=True)


def check_replaceable(out: str | os.PathLike, overwrite: bool, sources: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an existing ``out`` unless ``overwrite``, and even then unless it is a previous output of
    ``atomic_dir`` (marked with ``EXPORT_MARKER``) that holds none of ``sources`` (the files being exported).
    Repairs an interrupted replacement of ``out`` first."""
    out = Path(out).expanduser().absolute()
    recover_interrupted_replace(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f'{out} already exists; pass overwrite=True (--overwrite) to replace it')
    real_out = out.resolve()
    for source in sources:
        real_source = Path(source).expanduser().resolve()
        if real_source == real_out or real_out in real_source.parents:
            raise FileExistsError(f'refusing to replace {out}: it contains the source {source}; the export is '
                                  f'never made in place, write it to another directory')
    if not (out.is_dir() and (out / EXPORT_MARKER).is_file()):
        what = 'a directory' if out.is_dir() else 'a file' if out.exists() else 'a broken link'
        raise FileExistsError(f'{out} is {what} that is not a previous export (it has no {EXPORT_MARKER}); '
                              f'--overwrite only replaces an earlier output of this exporter. Choose another '
                              f'output directory or remove {out} yourself')


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f'{out} already exists; pass overwrite=True (--overwrite) to replace it')
