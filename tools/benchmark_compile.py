"""Compile time of InternViT(compile=True) for 4 and 8 blocks: regional compilation should not double it.

    python tools/benchmark_compile.py [--depths 4 8] [--preset internvit_300m_448] [--img-size 56] [--train]

All blocks share one compiled graph (the last column), so compile time should not grow with depth. Each depth runs
``tools/benchmark_backbone.py --compile`` in a fresh process with an empty inductor cache (a warm on-disk cache would
hide the compilation). Compile time = first step - a steady step.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import tempfile

TOOLS = osp.dirname(osp.abspath(__file__))


def compile_seconds(depth: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix='inductor_cache_') as cache, \
            tempfile.NamedTemporaryFile(suffix='.jsonl') as out:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        cmd = [sys.executable, osp.join(TOOLS, 'benchmark_backbone.py'), '--compile', '--preset', args.preset,
               '--depth', str(depth), '--img-size', str(args.img_size), '--batch', str(args.batch),
               '--dtype', args.dtype, '--device', args.device, '--warmup', '2', '--iters', '2',
               '--json', out.name] + (['--train'] if args.train else [])
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        result = json.loads(open(out.name).read().splitlines()[0])
    result['compile_seconds'] = result['first_step_seconds'] - result['seconds_per_batch']
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--depths', type=int, nargs='+', default=[4, 8])
    p.add_argument('--preset', default='internvit_300m_448')
    p.add_argument('--img-size', type=int, default=28)
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--dtype', default='float32')
    p.add_argument('--device', default='cpu')
    p.add_argument('--train', action='store_true', help='forward+backward (compiles the backward too)')
    args = p.parse_args(argv)
    rows = [compile_seconds(d, args) for d in args.depths]
    mode = 'forward+backward' if args.train else 'inference'
    print(f'| {args.preset} {args.img_size}px batch {args.batch} {args.dtype} {mode} on {rows[0]["device_name"]} '
          f'| compile s | steady step s | compiled graphs |')
    print('|---|---|---|---|')
    for r in rows:
        print(f"| {r['depth']} blocks | {r['compile_seconds']:.1f} | {r['seconds_per_batch']:.3f} | "
              f"{r['compiled_graphs']} |")
    return rows


if __name__ == '__main__':
    main()
