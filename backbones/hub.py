"""Hugging Face hub ids where a local path is expected: ``'OpenGVLab/InternViT-6B-448px-V1-5'`` resolves to the
snapshot in huggingface_hub's cache, downloading it when allowed (``HF_HUB_OFFLINE=1`` forbids it; ``HF_HOME`` /
``HF_HUB_CACHE`` choose the cache). An existing local path always wins over a hub id of the same spelling.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ['PUBLISHED_HUB_IDS', 'local_path', 'looks_like_hub_id']

# The published weights of each preset (timm.create_model(name, pretrained=True) fetches these).
PUBLISHED_HUB_IDS = {
    'internvit_6b_224': 'OpenGVLab/InternViT-6B-224px',
    'internvit_6b_448': 'OpenGVLab/InternViT-6B-448px-V1-5',
    'internvit_300m_448': 'OpenGVLab/InternViT-300M-448px',
}

_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$')
# First try without pickled formats: repos that ship safetensors often ship .bin copies too.
_PICKLED = ['*.bin', '*.pth', '*.pt', '*.ckpt', '*.msgpack', '*.h5', '*.onnx']


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith(('.', '/', '~'))


def local_path(path: str | os.PathLike, *, what: str = 'checkpoint') -> Path:
    """``path`` itself when it exists, else the cached (or downloaded) snapshot of the hub id ``owner/name[@rev]``.

    Raises ``FileNotFoundError`` naming the path / id and the ``hf download`` command when neither works.
    """
    local = Path(path).expanduser()
    if local.exists():
        return local
    name = os.fspath(path)
    if not looks_like_hub_id(name):
        raise FileNotFoundError(f'{what} {name} does not exist')
    repo_id, _, revision = name.partition('@')
    try:
        from huggingface_hub import snapshot_download
        snapshot = Path(snapshot_download(repo_id, revision=revision or None, ignore_patterns=_PICKLED))
        if not any(snapshot.rglob('*.safetensors')):
            snapshot = Path(snapshot_download(repo_id, revision=revision or None))
    except ImportError:
        reason = 'huggingface_hub is not installed'
    except Exception as err:  # offline, not cached, no such repo, gated, ...: huggingface_hub's own errors
        reason = f'{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}'.rstrip(': ')
    else:
        return snapshot
    offline = os.environ.get('HF_HUB_OFFLINE', '').upper() in ('1', 'ON', 'YES', 'TRUE')
    revision_flag = f' --revision {revision}' if revision else ''
    raise FileNotFoundError(
        f'{what} {name} is not a local path, and as a Hugging Face hub id it is not in the cache'
        f'{" (HF_HUB_OFFLINE is set)" if offline else ""} and could not be downloaded ({reason}). '
        f'Download it first: hf download {repo_id}{revision_flag}   (or pass a local directory)')
