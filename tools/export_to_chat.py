#!/usr/bin/env python
"""Export InternViT weights to a Hugging Face InternVisionModel directory, or into a copy of an InternVL-Chat model.

    python tools/export_to_chat.py SRC OUT [--image-size 448] [--dtype bfloat16] [--num-heads N]
    python tools/export_to_chat.py SRC OUT --format native [--verify]    # transformers.AutoModel.from_pretrained(OUT)
    python tools/export_to_chat.py SRC OUT --into-chat CHAT_DIR [--verify] [--overwrite]

SRC: any layout ``backbones.reading`` reads: an HF or chat directory, the original ``.pth``, an MMEngine
segmentation/classification checkpoint (``backbone.`` prefix), transformers' native layout, safetensors files.

OUT: without ``--into-chat``, an HF ``InternVisionModel`` directory (config.json + safetensors) whose position
embedding is resampled to ``--image-size`` (default 448, the InternVL-Chat input size), stored in ``--dtype``.
With ``--format native``, transformers' own ``InternVLVisionModel`` layout instead, which
``transformers.AutoModel.from_pretrained(OUT)`` loads without remote code.
With ``--into-chat CHAT_DIR``, a new directory: a copy of CHAT_DIR with its ``vision_model.*`` tensors replaced
(shapes checked, dtypes and image size of the chat model kept, every other file and tensor unchanged).
CHAT_DIR is never modified. OUT is written beside its final place and renamed when complete; an existing OUT is
refused unless ``--overwrite``, which replaces only a previous export (marked by a ``.internvit_export`` file) that
does not contain SRC: a run directory, a chat model or any other folder is never deleted.

The architecture comes from SRC: its config.json, or for a training checkpoint the run's config that MMEngine
stores in it (``meta.cfg``, read without executing it); ``--num-heads`` is needed only when nothing says it.

``--verify`` runs the source weights and OUT (the native layout through transformers' ``InternVLVisionModel``,
the others through this package's loader) on a random batch in fp32 and compares the final tokens: the largest
absolute difference divided by the largest absolute output must not exceed ``--tolerance`` (default 1e-4 for
float32 exports, 5e-2 for 16-bit ones, whose rounding of every weight adds up over the layers). Exit status 1 when
it does, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and backbones are imported by the functions that use them: --help answers at once
    import torch

    from backbones.internvit import InternViT


# --verify's default bound on max|difference| / max|output|, by the dtype OUT stores
DEFAULT_TOLERANCE = {'float32': 1e-4, 'float64': 1e-4, 'bfloat16': 5e-2, 'float16': 5e-2}


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
    parser.add_argument('--format', choices=['hf', 'native'], default='hf',
                        help="OUT's layout without --into-chat: hf = InternVisionModel (InternVL-Chat's), native = "
                             "transformers' InternVLVisionModel (AutoModel.from_pretrained, no remote code)")
    parser.add_argument('--num-heads', type=int, default=None,
                        help="attention heads, only for checkpoints that do not say it (no config.json, no run "
                             "config); default then 25 for width 3200, 16 for width 1024")
    parser.add_argument('--verify', action='store_true',
                        help='run the source and OUT on a random batch; exit 1 if they differ by more than '
                             '--tolerance')
    parser.add_argument('--tolerance', type=float, default=None,
                        help='--verify bound on max|difference| / max|output| (default 1e-4 for float32, '
                             '5e-2 for bfloat16/float16)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace OUT if it is a previous export (never a directory holding SRC)')
    parser.add_argument('--verify-batch', type=int, default=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def log(msg: str) -> None:
    print(f'[export_to_chat {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def _chat_vision_config(chat_dir: str) -> dict:
    config_file = Path(chat_dir) / 'config.json'
    if not config_file.is_file():
        raise FileNotFoundError(f'{config_file} does not exist: --into-chat needs an InternVL-Chat directory')
    from backbones.arch_config import vision_config_of
    from backbones.layouts import WeightsError
    config = json.loads(config_file.read_text())
    vision = vision_config_of(config)
    if vision is None or 'vision_config' not in config:
        raise WeightsError(f'{chat_dir} is not an InternVL-Chat checkpoint: its config.json has no vision_config')
    return vision


def _loaded_model(arch, state_dict, source: str) -> InternViT:
    """An fp32 model holding exactly these weights (no random init: slow for 6B)."""
    import torch

    from backbones.internvit import InternViT
    from backbones.loading import build_and_load
    return build_and_load(lambda: InternViT(arch), state_dict, source=source, dtype=torch.float32)


def _forward(model: InternViT, images: torch.Tensor) -> torch.Tensor:
    import torch
    model.eval()
    with torch.no_grad():
        return model.forward_features(images)


def export(args: argparse.Namespace) -> int:
    from backbones.arch_config import arch_for_weights
    from backbones.atomic import check_replaceable
    from backbones.dtypes import as_dtype
    from backbones.layouts import WeightsError
    from backbones.reading import read_weights
    from backbones.writing import write_hf, write_hf_native, write_into_chat
    start = time.time()
    out = Path(args.out)
    # before the (long) read; checked again before the rename
    check_replaceable(out, args.overwrite, [args.src] + ([args.into_chat] if args.into_chat else []))

    log(f'reading {args.src}')
    weights = read_weights(args.src)
    chat_vision = _chat_vision_config(args.into_chat) if args.into_chat else None
    num_heads = args.num_heads
    if num_heads is None and weights.hf_config is None and chat_vision is not None:
        num_heads = chat_vision.get('num_attention_heads')  # the chat model says how many heads it has
    arch = arch_for_weights(weights, num_heads=num_heads)
    log(f'source: {weights.layout} layout, {len(weights.state_dict)} tensors, {arch.depth} layers, '
        f'width {arch.embed_dim}, {arch.num_heads} heads, {arch.img_size}px position embedding')

    if args.into_chat and args.format != 'hf':
        raise WeightsError(f'--format {args.format} does not apply with --into-chat: the copy keeps the chat '
                           f"model's own layout")
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
        writer, what = (write_hf_native, "transformers' InternVLVisionModel") if args.format == 'native' else \
            (write_hf, 'HF InternVisionModel')
        log(f'writing {what} directory {out} ({image_size}px, {dtype})')
        writer(weights.state_dict, arch, out, image_size=image_size, dtype=dtype, overwrite=args.overwrite,
               source=args.src)
    log(f'done in {time.time() - start:.1f}s: {out}')

    if args.verify:
        diff, scale, stored = verify(weights, arch, out, image_size, args.verify_batch, args.format)
        tolerance = args.tolerance if args.tolerance is not None else max(DEFAULT_TOLERANCE[d] for d in stored)
        relative = diff / max(scale, 1e-12)
        verdict = 'within' if relative <= tolerance else 'EXCEEDS'
        print(f'verify: relative difference {relative:.3g} {verdict} the tolerance {tolerance:g}', flush=True)
        if relative > tolerance:
            print(f'export_to_chat: error: {out} does not reproduce the source model (relative difference '
                  f'{relative:.3g} > --tolerance {tolerance:g})', file=sys.stderr, flush=True)
            return 1
    return 0


def _transformers_forward(out: Path, images: torch.Tensor) -> tuple[torch.Tensor, set]:
    """Final tokens of transformers' own model class for the native layout (AutoModel, no remote code), and the
    dtype the export stores (its config.json)."""
    import torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(str(out), dtype=torch.float32, attn_implementation='eager').eval()
    stored = {json.loads((out / 'config.json').read_text())['dtype']}
    with torch.no_grad():
        return model(pixel_values=images).last_hidden_state, stored


def verify(weights, arch, out: Path, image_size: int, batch: int, layout: str = 'hf'):
    """Largest |difference| of final tokens between the source weights and the re-read export (fp32 compute);
    returns (difference, largest |source output|, the names of the dtypes OUT stores)."""
    import torch

    from backbones.arch_config import arch_for_weights
    from backbones.reading import read_weights
    log(f'verify: running the source model and the reloaded export on a random {batch}x3x{image_size}x'
        f'{image_size} batch (fp32)')
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    source_model = _loaded_model(arch, weights.state_dict, weights.source)
    reference = _forward(source_model, images)
    del source_model  # one model in memory at a time (6B in fp32 is 24 GB)

    if layout == 'native':
        output, stored = _transformers_forward(out, images)
    else:
        exported_weights = read_weights(out)
        stored = {str(t.dtype).replace('torch.', '') for t in exported_weights.state_dict.values()}
        exported = _loaded_model(arch_for_weights(exported_weights, num_heads=arch.num_heads),
                                 exported_weights.state_dict, str(out))
        del exported_weights
        output = _forward(exported, images)
    diff = (output - reference).abs().max().item()
    scale = reference.abs().max().item()
    print(f'verify: max abs difference {diff:.6g} between {out} (stored as {", ".join(sorted(stored))}) and the '
          f'source (outputs up to '
          f'{scale:.6g})', flush=True)
    return diff, scale, stored


def main(argv=None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:  # show what the weight code reports (resampling, files written)
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='[%(name)s] %(message)s')
    from backbones.layouts import WeightsError
    try:
        return export(args)
    except (WeightsError, FileExistsError, FileNotFoundError) as err:
        print(f'export_to_chat: error: {err}', file=sys.stderr, flush=True)
        return 2


if __name__ == '__main__':
    sys.exit(main())
