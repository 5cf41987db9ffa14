"""Throughput of the InternViT backbone: images/s, achieved TFLOP/s and peak memory.

    python tools/benchmark_backbone.py --preset internvit_6b_224 --batch 64 --dtype bfloat16 --compile
    python tools/benchmark_backbone.py --preset internvit_6b_448 --img-size 448 --batch 16 --dtype bfloat16
    python tools/benchmark_backbone.py --preset internvit_tiny --img-size 224 --batch 8 --compare-eager   # CPU

FLOPs per image: layers x (2N(4C^2 + 2C*MLP) + 4N^2 C), N tokens with cls; a training step
counts three times the forward. ``--compare-eager`` also times the same model with eager attention (the
published code's default) in the same run and prints the speed ratio (eager time / ours; higher is better).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the model are imported when a benchmark runs, so that --help answers at once
    import torch

    from backbones import InternViT


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', default='internvit_6b_224',
                   help='a name of backbones.PRESETS (internvit_6b_224, internvit_6b_448, internvit_300m_448, ...)')
    for field in ('embed_dim', 'depth', 'num_heads', 'mlp_dim'):
        p.add_argument('--' + field.replace('_', '-'), type=int, help='override the preset (custom size)')
    p.add_argument('--img-size', type=int, default=None, help='input side (default: the preset\'s)')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--dtype', default=None, help='bfloat16 | float16 | float32 (default: bfloat16 on CUDA, '
                                                 'float32 on the CPU)')
    p.add_argument('--attn', default='sdpa', choices=('sdpa', 'eager', 'flash_attn'))
    p.add_argument('--compile', action='store_true', help='compile every block (InternViT(compile=True))')
    p.add_argument('--train', action='store_true', help='time forward+backward instead of inference')
    p.add_argument('--grad-checkpointing', action='store_true')
    p.add_argument('--device', default=None, help='default: cuda where available, else cpu')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps (at least 1; the first one compiles)')
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--compare-eager', action='store_true', help='also time eager attention, print the ratio')
    p.add_argument('--json', help='append the results as one JSON line to this file')
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error('--warmup must be at least 1 (the first step is timed apart: it compiles with --compile)')
    return args


def build(args, attn_impl: str) -> InternViT:
    import torch

    from backbones import InternViT
    overrides = {k: getattr(args, k) for k in ('embed_dim', 'depth', 'num_heads', 'mlp_dim') if getattr(args, k)}
    if args.img_size:
        overrides['img_size'] = args.img_size
    torch.manual_seed(0)
    with torch.device(args.device):
        model = InternViT(args.preset, attn_impl=attn_impl, dtype=args.dtype,
                          grad_checkpointing=args.grad_checkpointing, compile=args.compile, **overrides)
    return model.train(args.train)


def peak_memory_gib(device: torch.device) -> float:
    import torch
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux: the process peak


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return counters['stats']['unique_graphs']


def time_model(args, attn_impl: str) -> dict:
    import torch

    from backbones import vit_forward_flops
    from backbones.dtypes import as_dtype
    device = torch.device(args.device)
    model = build(args, attn_impl)
    side = args.img_size or model.arch.img_size
    x = torch.randn(args.batch, 3, side, side, device=device, dtype=as_dtype(args.dtype))

    def step():
        if args.train:
            model.forward_features(x).float().pow(2).mean().backward()
        else:
            with torch.inference_mode():
                model.forward_features(x)

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step()  # with --compile, this first step compiles
    sync()
    first_step = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.iters
    flops = vit_forward_flops(model.arch, side, side) * args.batch * (3 if args.train else 1)
    result = dict(preset=args.preset, depth=model.depth, width=model.embed_dim, img_size=side, batch=args.batch,
                  dtype=args.dtype, attn=attn_impl, compile=args.compile, train=args.train, device=str(device),
                  device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
                  seconds_per_batch=seconds, first_step_seconds=first_step, images_per_s=args.batch / seconds,
                  tflops=flops / seconds / 1e12,
                  peak_memory_gib=peak_memory_gib(device),
                  compiled_graphs=compiled_graphs() if args.compile else 0)
    return result


def report(r: dict) -> None:
    mode = 'fwd+bwd' if r['train'] else 'inference'
    print(f"{r['device_name']} | {r['preset']} ({r['depth']} layers, C={r['width']}) {r['img_size']}px "
          f"batch {r['batch']} {r['dtype']} attn={r['attn']} compile={r['compile']} {mode}: "
          f"{r['images_per_s']:.2f} img/s, {r['tflops']:.1f} TFLOP/s, peak memory {r['peak_memory_gib']:.2f} GiB, "
          f"first step {r['first_step_seconds']:.1f} s",
          flush=True)


def main(argv=None):
    args = parse_args(argv)
    import torch
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    args.dtype = args.dtype or ('float32' if args.device == 'cpu' else 'bfloat16')
    if args.device == 'cpu':
        torch.set_num_threads(os.cpu_count() or 1)
    results = [time_model(args, args.attn)]
    report(results[0])
    if args.compare_eager and args.attn != 'eager':
        results.append(time_model(args, 'eager'))
        report(results[1])
        ratio = results[1]['seconds_per_batch'] / results[0]['seconds_per_batch']
        print(f'speed vs eager-attention reference: {ratio:.2f}x (eager time / {args.attn} time)')
    if args.json:
        with open(args.json, 'a') as f:
            for r in results:
                f.write(json.dumps(r) + '\n')
    return results


if __name__ == '__main__':
    main()
