"""Time and memory of ``InternViT.from_pretrained`` against merely reading the same safetensors file.

    python tools/benchmark_loading.py                                  # 300M preset, bf16 file, fp32 and bf16 models
    python tools/benchmark_loading.py --preset internvit_6b_448 --dtypes bfloat16 --work-dir /scratch/bench

A random checkpoint of the preset is written once as an HF directory (bf16, as published), read once to put it in
the page cache, then each measurement runs in a fresh interpreter: the reads (a) ``safetensors.torch.load_file``
(a lazy memory map since safetensors 0.8), (b) the same with every tensor touched once (``sum``), (c) the file's
bytes into memory (``read``), and (d) ``InternViT.from_pretrained`` of the directory in each model dtype (the
file's dtype makes the parameters copy-on-write views of the file, as (a) does; another dtype is one conversion
per tensor). Printed: the best of ``--repeats`` wall times, (d) relative to each read, and the peak resident memory
the step added to the interpreter (``VmHWM`` minus the resident size after imports) relative to the loaded model's
parameter bytes. Goals: time <= 1.5x, memory <= 1.3x.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r'''
import json, sys, time
import torch
import backbones
from safetensors.torch import load_file
torch.set_num_threads({threads})

def status(field):  # kB figures of /proc/self/status: VmRSS now, VmHWM the peak of this process
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ':'))

base = status('VmRSS')
start = time.perf_counter()
if {what!r} == 'load_file':
    tensors = load_file({file!r})
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
elif {what!r} == 'load_file_touched':
    tensors = load_file({file!r})
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values() if t.sum() is not None)
elif {what!r} == 'read':
    with open({file!r}, 'rb') as f:
        nbytes = len(f.read())
else:
    model = backbones.InternViT.from_pretrained({directory!r}, dtype={dtype!r})
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
seconds = time.perf_counter() - start
print(json.dumps(dict(seconds=seconds, added_peak_bytes=max(status('VmHWM') - base, 0), nbytes=nbytes)))
'''


READS = ('load_file', 'load_file_touched', 'read')


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--preset', default='internvit_300m_448')
    p.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'], help='model dtypes to load into')
    p.add_argument('--repeats', type=int, default=3, help='runs per measurement; the fastest counts')
    p.add_argument('--threads', type=int, default=1, help='torch threads in the measured interpreters')
    p.add_argument('--work-dir', default=None, help='where the checkpoint is written (default: a temporary dir)')
    return p.parse_args(argv)


WRITE = r'''
import torch
from backbones import InternViT
from backbones.writing import write_hf
with torch.no_grad():
    model = InternViT({preset!r})
    write_hf(model.state_dict(), model.arch, {out!r}, dtype=torch.bfloat16)
'''


def write_checkpoint(preset: str, out: Path) -> None:
    # In its own interpreter, so that this process stays small (children inherit nothing of its memory).
    subprocess.run([sys.executable, '-c', WRITE.format(preset=preset, out=str(out))], check=True)


def measure(what: str, directory: Path, dtype: str | None, threads: int, repeats: int) -> dict:
    code = CHILD.format(what=what, file=str(directory / 'model.safetensors'), directory=str(directory),
                        dtype=dtype, threads=threads)
    runs = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode:
            raise RuntimeError(f'{what} failed:\n{proc.stderr[-3000:]}')
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r['seconds'])
    return dict(best, added_peak_bytes=min(r['added_peak_bytes'] for r in runs))


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.work_dir or tempfile.mkdtemp(prefix='benchmark_loading_'))
    directory = root / args.preset
    if not (directory / 'model.safetensors').is_file():
        start = time.perf_counter()
        write_checkpoint(args.preset, directory)
        print(f'wrote a random {args.preset} checkpoint to {directory} in {time.perf_counter() - start:.1f}s')
    with open(directory / 'model.safetensors', 'rb') as f:  # into the page cache: every step reads from memory
        while f.read(1 << 26):
            pass
    gib = 2 ** 30
    results = {}
    for read in READS:
        results[read] = measure(read, directory, None, args.threads, args.repeats)
        print(f'{read}: {results[read]["seconds"]:.2f}s for {results[read]["nbytes"] / gib:.2f} GiB, added peak RSS '
              f'{results[read]["added_peak_bytes"] / gib:.2f} GiB')
    for dtype in args.dtypes:
        load = measure('from_pretrained', directory, dtype, args.threads, args.repeats)
        ratios = {read: load['seconds'] / results[read]['seconds'] for read in READS}
        results[dtype] = dict(load, time_ratios=ratios, memory_ratio=load['added_peak_bytes'] / load['nbytes'])
        print(f'from_pretrained(dtype={dtype}): {load["seconds"]:.2f}s = '
              + ', '.join(f'{r:.2f}x {read}' for read, r in ratios.items()) + ' (goal <= 1.5x); model '
              f'{load["nbytes"] / gib:.2f} GiB, added peak RSS {load["added_peak_bytes"] / gib:.2f} GiB = '
              f'{results[dtype]["memory_ratio"]:.2f}x the model (goal <= 1.3x)')
    print(json.dumps(results))
    return 0


if __name__ == '__main__':
    sys.exit(main())
