#!/usr/bin/env python
"""Export InternViT weights to a Hugging Face InternVisionModel directory, or into a copy of an InternVL-Chat model.

    python tools/export_to_chat.py SRC OUT [--image-size 448] [--dtype bfloat16] [--num-heads N]
    python tools/export_to_chat.py SRC OUT --into-chat CHAT_DIR [--verify] [--overwrite]

SRC: any layout ``backbones.reading`` reads: an HF or chat directory, the original ``.pth``, an MMEngine
segmentation/classification checkpoint (``backbone.`` prefix), transformers' native layout, safetensors files.

OUT: without ``--into-chat``, an HF ``InternVisionModel`` directory (config.json + safetensors) whose position
embedding is resampled to ``--image-size`` (default 448, the InternVL-Chat input size), stored in ``--dtype``.
With ``--into-chat CHAT_DIR``, a new directory: a copy of CHAT_DIR with its ``vision_model.*`` tensors replaced
(shapes checked, dtypes and image size of the chat model kept, every other file and tensor unchanged).
CHAT_DIR is never modified. OUT is written beside its final place and renamed when complete; an existing OUT is
refused unless ``--overwrite``.

``--verify`` reloads OUT with this package's loader and prints the largest absolute difference between its
outputs and the source model's on a random batch.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

if importlib.util.find_spec('backbones') is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from backbones.arch_config import arch_for_weights, vision_config_of  # noqa: E402
from backbones.dtypes import as_dtype  # noqa: E402
from backbones.internvit import InternViT  # noqa: E402
from backbones.layouts import WeightsError  # noqa: E402
from backbones.loading import load_into_model  # noqa: E402
from backbones.reading import read_weights  # noqa: E402
from backbones.writing import write_hf, write_into_chat  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n\n', 1)[1])
    parser.add_argument('src', metavar='SRC', help='InternViT weights in any supported layout (file or directory)')
    parser.add_argument('out', metavar='OUT', help='output directory (must not exist unless --overwrite)')
    parser.add_argument('--image-size', type=int, default=None,
                        help='input size the exported position embedding is for (default 448; with --into-chat '
                             "the chat model's vision image size)")
    parser.add_argument('--dtype', default=None,
                        help="dtype of the exported tensors (default bfloat16; --into-chat keeps the chat's)")
    parser.add_argument('--into-chat', metavar='CHAT_DIR', default=None,
                        help='make OUT a copy of this InternVL-Chat directory with its vision tensors replaced')
    parser.add_argument('--num-heads', type=int, default=None,
                        help='attention heads, for checkpoints without a config (default: 25 for width 3200, '
                             '16 for width 1024)')
    parser.add_argument('--verify', action='store_true',
                        help='reload OUT and print the largest output difference to the source model')
    parser.add_argument('--overwrite', action='store_true', help='replace OUT if it exists')
    parser.add_argument('--verify-batch', type=int, default=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def log(msg: str) -> None:
    print(f'[export_to_chat {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def _chat_vision_config(chat_dir: str) -> dict:
    config_file = Path(chat_dir) / 'config.json'
    if not config_file.is_file():
        raise FileNotFoundError(f'{config_file} does not exist: --into-chat needs an InternVL-Chat directory')
    config = json.loads(config_file.read_text())
    vision = vision_config_of(config)
    if vision is None or 'vision_config' not in config:
        raise WeightsError(f'{chat_dir} is not an InternVL-Chat checkpoint: its config.json has no vision_config')
    return vision


def _loaded_model(arch, state_dict, source: str) -> InternViT:
    """An fp32 model holding exactly these weights; built on the meta device to skip random init (slow for 6B)."""
    with torch.device('meta'):
        model = InternViT(arch)
    model.to_empty(device='cpu')
    load_into_model(model, state_dict, source=source)  # strict: every parameter is overwritten
    return model.float()


def _forward(model: InternViT, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.forward_features(images)


def export(args: argparse.Namespace) -> int:
    start = time.time()
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f'{out} already exists; pass --overwrite to replace it')

    log(f'reading {args.src}')
    weights = read_weights(args.src)
    chat_vision = _chat_vision_config(args.into_chat) if args.into_chat else None
    num_heads = args.num_heads
    if num_heads is None and weights.hf_config is None and chat_vision is not None:
        num_heads = chat_vision.get('num_attention_heads')  # the chat model says how many heads it has
    arch = arch_for_weights(weights, num_heads=num_heads)
    log(f'source: {weights.layout} layout, {len(weights.state_dict)} tensors, {arch.depth} layers, '
        f'width {arch.embed_dim}, {arch.num_heads} heads, {arch.img_size}px position embedding')

    if args.into_chat:
        image_size = int(chat_vision['image_size'])
        if args.image_size is not None and args.image_size != image_size:
            raise WeightsError(f'--image-size {args.image_size} contradicts the chat model ({args.into_chat} '
                               f'vision_config image_size {image_size}); leave it out with --into-chat')
        if args.dtype is not None:
            log(f'--dtype {args.dtype} ignored: tensors keep the chat checkpoint\'s dtypes')
        log(f'writing {out} as a copy of {args.into_chat} with the vision tensors replaced ({image_size}px)')
        write_into_chat(weights.state_dict, args.into_chat, out, overwrite=args.overwrite, source=args.src)
    else:
        image_size = args.image_size or 448
        dtype = as_dtype(args.dtype or 'bfloat16')
        log(f'writing HF InternVisionModel directory {out} ({image_size}px, {dtype})')
        write_hf(weights.state_dict, arch, out, image_size=image_size, dtype=dtype, overwrite=args.overwrite)
    log(f'done in {time.time() - start:.1f}s: {out}')

    if args.verify:
        verify(weights, arch, out, image_size, args.verify_batch)
    return 0


def verify(weights, arch, out: Path, image_size: int, batch: int) -> float:
    """Largest |difference| of final tokens between the source weights and the re-read export (fp32 compute)."""
    log(f'verify: running the source model and the reloaded export on a random {batch}x3x{image_size}x'
        f'{image_size} batch (fp32)')
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    source_model = _loaded_model(arch, weights.state_dict, weights.source)
    reference = _forward(source_model, images)
    del source_model  # one model in memory at a time (6B in fp32 is 24 GB)

    exported_weights = read_weights(out)
    stored = {str(t.dtype).replace('torch.', '') for t in exported_weights.state_dict.values()}
    exported = _loaded_model(arch_for_weights(exported_weights, num_heads=arch.num_heads),
                             exported_weights.state_dict, str(out))
    del exported_weights
    diff = (_forward(exported, images) - reference).abs().max().item()
    scale = reference.abs().max().item()
    print(f'verify: max abs difference {diff:.6g} between {out} (stored as {", ".join(sorted(stored))}) and the '
          f'source (outputs up to {scale:.6g})', flush=True)
    return diff


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return export(args)
    except (WeightsError, FileExistsError, FileNotFoundError) as err:
        print(f'export_to_chat: error: {err}', file=sys.stderr, flush=True)
        return 2


if __name__ == '__main__':
    sys.exit(main())
