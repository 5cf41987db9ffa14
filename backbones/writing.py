"""Writing InternViT weights: HF ``InternVisionModel`` and native directories, a chat checkpoint with new vision
tensors."""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch

from .arch_config import _square, hf_config_from_arch, native_config_from_arch, vision_config_of
from .atomic import atomic_dir, atomic_path, check_replaceable, json_dump
from .dtypes import as_dtype
from .internvit import InternViT
from .layouts import (
    WeightsError,
    _canonical_names,
    _layer_indices,
    _natural_key,
    _plan,
    as_canonical,
    from_canonical,
)
from .loading import _check, _resample_to_grid, compare_state_dicts
from .presets import InternViTArch
from .reading import _checkpoint_error, _read_config, _safetensors_error, _tensor_specs, safe_torch_load, weight_files

logger = logging.getLogger(__name__)

__all__ = ['write_hf', 'write_hf_native', 'write_into_chat', 'save_safetensors_shards']

def _expected_shapes(arch: InternViTArch) -> dict[str, torch.Size]:
    with torch.device('meta'):
        model = InternViT(arch)
    return {k: v.shape for k, v in model.state_dict().items()}


def _as_torch_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return as_dtype(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace('torch.', '')


def _prepare_export(state_dict: Mapping[str, torch.Tensor], arch: InternViTArch, image_size: int | None,
                    source: str) -> tuple[dict[str, torch.Tensor], InternViTArch]:
    state_dict = as_canonical(state_dict)
    target = replace(arch, img_size=int(image_size or arch.img_size))
    sd = dict(state_dict)
    _resample_to_grid(sd, target.grid_size, source)
    sd = _check(sd, _expected_shapes(target), target.depth, source, strict=True)
    return sd, target


def save_safetensors_shards(tensors: Mapping[str, torch.Tensor], out: Path, max_shard_bytes: int,
                      metadata: dict | None = None) -> list[str]:
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json above the size.

    The shards are huggingface_hub's (``split_torch_state_dict_into_shards``: in name order, a new file when the
    next tensor would pass ``max_shard_bytes``), so the directory is what ``save_pretrained`` writes.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from tqdm import tqdm
    ordered = {name: tensors[name] for name in sorted(tensors, key=_natural_key)}
    split = split_torch_state_dict_into_shards(ordered, filename_pattern='model{suffix}.safetensors',
                                               max_shard_size=max_shard_bytes)
    metadata = metadata or {'format': 'pt'}
    files = list(split.filename_to_tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    # Bytes written with an ETA, on a terminal only (disable=None: tqdm stays quiet when stderr is not a TTY).
    progress = tqdm(total=total, unit='B', unit_scale=True, desc=f'writing {out.name}', disable=None)
    for file, names in split.filename_to_tensors.items():
        # Each file under a temporary name first, so a directory written in place never holds half a file.
        with atomic_path(out / file) as tmp:
            save_file({n: tensors[n].contiguous().clone() for n in names}, str(tmp), metadata=metadata)
        progress.update(sum(tensors[n].numel() * tensors[n].element_size() for n in names))
        logger.info(f'wrote {out.name}/{file} ({len(names)} tensors)')
    progress.close()
    index = out / 'model.safetensors.index.json'
    if split.is_sharded:
        json_dump({'metadata': {'total_size': total}, 'weight_map': split.tensor_to_filename}, index)
        files.append(index.name)
    elif index.exists():
        index.unlink()  # a stale index from an earlier sharded save would point at the wrong files
    return files


def write_hf(state_dict: Mapping[str, torch.Tensor], arch: InternViTArch, out_dir: str | os.PathLike, *,
             image_size: int | None = None, dtype=torch.bfloat16, max_shard_bytes: int = 5 * 2 ** 30,
             overwrite: bool = False, source: str | os.PathLike | None = None) -> Path:
    """Write an HF ``InternVisionModel`` directory (config.json + safetensors), loadable by the published code.

    The position embedding is resampled to ``image_size`` (default: the arch's) and config.json says so.
    Written into a temporary directory beside ``out_dir`` and renamed at the end; an existing ``out_dir`` is
    refused unless ``overwrite`` and a previous export not containing ``source`` (the file or directory the
    weights came from, also named in errors about them), and then replaced only once the new one is complete.
    """
    out = Path(out_dir)
    sources = [source] if source is not None else []
    check_replaceable(out, overwrite, sources)
    dtype = _as_torch_dtype(dtype)
    sd, target = _prepare_export(state_dict, arch, image_size, str(source or 'the exported state dict'))
    config = hf_config_from_arch(target)
    tensors = {k: v.detach().to(dtype) if dtype else v.detach() for k, v in sd.items()}
    config['torch_dtype'] = _dtype_name(dtype or next(iter(tensors.values())).dtype)
    with atomic_dir(out, overwrite, sources) as tmp:
        json_dump(config, tmp / 'config.json')
        save_safetensors_shards(tensors, tmp, max_shard_bytes)
    logger.info(f'wrote HF InternVisionModel directory {out} ({target.depth} layers, {target.img_size}px, '
              f'{config["torch_dtype"]})')
    return out


def write_hf_native(state_dict: Mapping[str, torch.Tensor], arch: InternViTArch, out_dir: str | os.PathLike, *,
                    image_size: int | None = None, dtype=torch.bfloat16, max_shard_bytes: int = 5 * 2 ** 30,
                    overwrite: bool = False, source: str | os.PathLike | None = None) -> Path:
    """Write the vision tower in transformers' native layout (``InternVLVisionModel.from_pretrained(out_dir)``).

    Same atomicity rules as ``write_hf``. transformers' q/k norms use eps 1e-6 whatever the config says, so an
    arch with qk-norm and another eps is refused rather than written wrong.
    """
    if arch.qk_norm and arch.norm_eps != 1e-6:
        raise WeightsError(f"transformers' InternVLVisionModel fixes the q/k-norm eps at 1e-6; this arch has "
                           f'{arch.norm_eps}')
    out = Path(out_dir)
    sources = [source] if source is not None else []
    check_replaceable(out, overwrite, sources)
    dtype = _as_torch_dtype(dtype)
    sd, target = _prepare_export(state_dict, arch, image_size, str(source or 'the exported state dict'))
    tensors = {k: v.detach().to(dtype) if dtype else v.detach() for k, v in from_canonical(sd, 'native').items()}
    config = native_config_from_arch(target)
    config['dtype'] = _dtype_name(dtype or next(iter(tensors.values())).dtype)
    with atomic_dir(out, overwrite, sources) as tmp:
        json_dump(config, tmp / 'config.json')
        save_safetensors_shards(tensors, tmp, max_shard_bytes)
    logger.info(f'wrote native InternVLVisionModel directory {out}')
    return out


def _is_within(path: Path, other: Path) -> bool:
    try:
        path.relative_to(other)
        return True
    except ValueError:
        return False


def write_into_chat(state_dict: Mapping[str, torch.Tensor], chat_dir: str | os.PathLike,
                    out_dir: str | os.PathLike, *, overwrite: bool = False, source: str = 'source') -> Path:
    """A new directory ``out_dir``: a copy of the chat checkpoint with its vision tensors replaced.

    Each replaced tensor keeps the chat checkpoint's name, shape (checked) and dtype; the position embedding is
    resampled to the chat's vision image size. Weight files without vision tensors and all other files are
    copied byte for byte; files with vision tensors are rewritten with their other tensors unchanged. The chat
    directory itself is never written.
    """
    chat = Path(chat_dir).expanduser().absolute()
    out = Path(out_dir).expanduser().absolute()
    if not chat.is_dir():
        raise FileNotFoundError(f'chat checkpoint directory {chat_dir} does not exist')
    if out.resolve() == chat.resolve() or _is_within(out.resolve(), chat.resolve()) or \
            _is_within(chat.resolve(), out.resolve()):
        raise WeightsError(f'refusing to write {out} over or inside the chat checkpoint {chat}: '
                           'the export is never made in place; choose another output directory')
    check_replaceable(out, overwrite, [source] if Path(source).exists() else [])
    config = _read_config(chat)
    vision = vision_config_of(config)
    if vision is None or 'vision_config' not in (config or {}):
        raise WeightsError(f'{chat} is not an InternVL-Chat checkpoint: its config.json has no vision_config')
    files = weight_files(chat)
    try:
        prefix, layout, selected, _ = _plan(files)
    except WeightsError as err:
        raise _checkpoint_error(chat, err) from None
    grid = _square(vision['image_size'], 'image_size') // _square(vision['patch_size'], 'patch_size')

    sd = dict(as_canonical(state_dict))
    _resample_to_grid(sd, grid, source)
    new = from_canonical(sd, layout, prefix)
    specs = _tensor_specs(files, selected)
    mismatch = compare_state_dicts(new, {k: torch.Size(shape) for k, (shape, _) in specs.items()})
    if mismatch:
        problems = []
        chat_layers = len(_layer_indices(_canonical_names(specs, layout, prefix)))
        if chat_layers != len(_layer_indices(sd)):
            problems.append(f'the chat vision model has {chat_layers} layers, the source {len(_layer_indices(sd))}')
        problems += mismatch.describe(found_as='source', expected_as='chat vision model')
        raise WeightsError(f'{source} does not fit {chat}: ' + '; '.join(problems))
    touched = {files[k] for k in specs}
    with atomic_dir(out, overwrite, [source] if Path(source).exists() else []) as tmp:
        for item in _walk_files(chat):
            rel = item.relative_to(chat)
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if item in touched:
                _rewrite_weight_file(item, target, {k: new[k].to(specs[k][1]) for k in specs if files[k] == item})
                shutil.copymode(item, target)
                logger.info(f'rewrote {rel} (vision tensors replaced)')
            else:
                shutil.copyfile(item, target)  # follows symlinks (HF cache snapshots): a real copy
                shutil.copystat(item, target)
        logger.info(f'copied {chat} with {len(specs)} vision tensors replaced in {len(touched)} weight file(s)')
    return out


def _walk_files(root: Path) -> list[Path]:
    """Every file under root, following symlinked directories (HF cache snapshots are symlinks)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames))
    return found


def _rewrite_weight_file(src: Path, dst: Path, replacements: Mapping[str, torch.Tensor]) -> None:
    if src.suffix == '.safetensors':
        from safetensors import safe_open
        from safetensors.torch import save_file
        try:
            with safe_open(str(src), framework='pt') as f:
                metadata = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:
            raise _safetensors_error(src, err) from None
        tensors.update({k: v.contiguous() for k, v in replacements.items()})
        save_file(tensors, str(dst), metadata=metadata)
    else:
        obj = safe_torch_load(src)
        if not isinstance(obj, dict) or not all(k in obj for k in replacements):
            raise WeightsError(f'cannot rewrite {src}: it is not a flat state dict')
        obj = dict(obj)
        obj.update({k: v.contiguous().clone() for k, v in replacements.items()})
        torch.save(obj, dst)
