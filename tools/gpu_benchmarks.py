"""Every benchmark of the project on one CUDA GPU, written as one JSON and one markdown table.

    python tools/gpu_benchmarks.py [--out work_dirs/gpu_benchmarks] [--wheels .whl] [--budget-s 420]
    python tools/gpu_benchmarks.py --cpu-smoke      # every case at a tiny size on the CPU (what the tests run)

Cases (bf16, random weights: speed does not depend on the values):
  * backbone inference: InternViT-6B at 224 px batch 64, 6B-448 (45 layers) at 448 px batch 16, 6B at 504 px batch
    16, each with eager attention (the published code's), SDPA, flash-attn (when the package is installed) and
    SDPA with every block compiled (the first step's time, which includes compiling, is in the JSON);
  * a few layers of 6B (8) at 504 px batch 8, forward+backward, SDPA and eager;
  * training steps of the segmentation configs at 504 crop, 2 images (tools/benchmark_segmentation.py): the 6B
    linear probe and UperNet head tuning (frozen backbone);
  * linear-probe feature extraction (``LinearProbe.summaries``: 6B-224, bf16, batch 64), the pass a feature cache
    or a sweep makes once per image.
Each row: the card's name, images/s, achieved TFLOP/s (DESIGN.md's count; x3 for forward+backward) and peak
memory (``max_memory_allocated``). Cases run in this order until ``--budget-s`` is spent; the rest are listed as
skipped. A case that fails is listed with its error and the others still run.

Without CUDA (and without ``--cpu-smoke``) it says so and exits 0 without writing anything.

mm* packages: a GPU image may lack mmengine, mmcv-lite and mmsegmentation (the backbone cases need none of them).
If they are missing and ``--wheels DIR`` holds wheels, they are installed with ``pip --no-index --no-deps --target
DIR/site`` and put on ``sys.path``. ``bash tools/gpu_wheels.sh`` downloads them (and their small pure-Python needs)
into ``.whl/`` on a machine with pip access.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import os.path as osp
import subprocess
import sys
import time
import traceback
from types import SimpleNamespace

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, osp.join(REPO, 'tools'))


MM_PACKAGES = ('mmengine', 'mmcv', 'mmseg')
SEG_CONFIGS = {
    'seg 6B linear probe train step': 'configs/segmentation/internvit_6b_linear_frozen_ade20k_504_80k.py',
    'seg 6B UperNet head tuning train step': 'configs/segmentation/internvit_6b_upernet_frozen_ade20k_504_80k.py',
}
PROBE_CONFIG = 'configs/classification/internvit_6b_224_linear_probe_in1k.py'
# On the CPU the 6B configs are shrunk to a tiny backbone (what --cpu-smoke runs).
TINY_SEG_OPTIONS = {
    'model.backbone.preset': 'internvit_tiny', 'model.data_preprocessor.size': [112, 112],
    'model.backbone.out_indices': [3], 'model.decode_head.in_channels': 64,
}
TINY_UPERNET_OPTIONS = {
    'model.backbone.preset': 'internvit_tiny', 'model.data_preprocessor.size': [112, 112],
    'model.backbone.out_indices': [0, 1, 2, 3], 'model.neck.in_channels': 64,
    'model.decode_head.in_channels': [64] * 4, 'model.decode_head.channels': 32,
    'model.auxiliary_head.in_channels': 64, 'model.auxiliary_head.channels': 16,
}


def install_mm_packages(wheels: str | None) -> str:
    """Make mmengine/mmcv/mmseg importable from carried wheels if they are missing; says what it did."""
    missing = [name for name in MM_PACKAGES if importlib.util.find_spec(name) is None]
    if not missing:
        return 'mm packages present'
    if not wheels or not osp.isdir(wheels):
        return f'missing {", ".join(missing)} and no --wheels folder: segmentation and probe cases will fail'
    target = osp.join(wheels, 'site')
    files = sorted(osp.join(wheels, f) for f in os.listdir(wheels) if f.endswith('.whl'))
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile',
                    '--upgrade', '--target', target, *files], check=True)
    sys.path.insert(0, target)
    importlib.invalidate_caches()
    return f'installed {len(files)} wheels from {wheels} into {target}'


def backbone_case(name, preset, side, batch, attn='sdpa', compile=False, train=False, depth=None):
    return dict(name=name, kind='backbone', preset=preset, img_size=side, batch=batch, attn=attn, compile=compile,
                train=train, depth=depth)


def cases(smoke: bool) -> list[dict]:
    out = []
    sizes = [('6B-224', 'internvit_6b_224', 224, 64), ('6B-448', 'internvit_6b_448', 448, 16),
             ('6B', 'internvit_6b_224', 504, 16)]
    for label, preset, side, batch in sizes:
        for attn, compiled in (('eager', False), ('sdpa', False), ('flash_attn', False), ('sdpa', True)):
            name = f'{label} forward {side}px b{batch} {attn}{" compiled" if compiled else ""}'
            out.append(backbone_case(name, preset, side, batch, attn, compiled))
    for attn in ('sdpa', 'eager'):
        out.append(backbone_case(f'8 layers of 6B fwd+bwd 504px b8 {attn}', 'internvit_6b_224', 504, 8, attn,
                                 train=True, depth=8))
    for name, config in SEG_CONFIGS.items():
        out.append(dict(name=name, kind='segmentation', config=config))
    out.append(dict(name='linear-probe feature extraction 6B-224 b64', kind='probe', config=PROBE_CONFIG,
                    img_size=224, batch=64))
    if smoke:  # tiny sizes on the CPU; the compiled cases are covered by tests/test_compile.py
        for case in out:
            case['name'] = 'tiny stand-in for ' + case['name']
            if case['kind'] == 'backbone':
                case.update(preset='internvit_tiny', img_size=56, batch=2, depth=2 if case['train'] else None)
            elif case['kind'] == 'probe':
                case.update(img_size=56, batch=2)
    return out


def skip_reason(case: dict, smoke: bool) -> str | None:
    if case.get('attn') == 'flash_attn' and importlib.util.find_spec('flash_attn') is None:
        return 'flash-attn not installed'
    if case.get('compile') and smoke:
        return 'compile not run in the CPU smoke test (tests/test_compile.py covers it)'
    return None


def run_backbone(case: dict, device: str, smoke: bool) -> dict:
    import benchmark_backbone
    argv = ['--preset', case['preset'], '--img-size', str(case['img_size']), '--batch', str(case['batch']),
            '--dtype', 'float32' if smoke else 'bfloat16', '--device', device,
            '--warmup', '1' if smoke else '3', '--iters', '1' if smoke else '10']
    argv += ['--compile'] * case['compile'] + ['--train'] * case['train']
    argv += ['--depth', str(case['depth'])] if case['depth'] else []
    args = benchmark_backbone.parse_args(argv)
    result = benchmark_backbone.time_model(args, case['attn'])
    benchmark_backbone.report(result)
    return result


def run_segmentation(case: dict, device: str, smoke: bool) -> dict:
    import benchmark_segmentation
    argv = [osp.join(REPO, case['config']), '--device', device, '--batch', '2']
    argv += ['--iters', '1', '--warmup', '1'] if smoke else ['--iters', '20', '--warmup', '5']
    if smoke:
        options = TINY_UPERNET_OPTIONS if 'upernet' in case['config'] else TINY_SEG_OPTIONS
        argv += ['--cfg-options'] + [f'{k}={json.dumps(v).replace(" ", "")}' for k, v in options.items()]
    return benchmark_segmentation.main(argv)


def run_probe(case: dict, device: str, smoke: bool) -> dict:
    import torch
    from mmengine.config import Config
    from mmengine.registry import MODELS

    import backbones  # noqa: F401
    import classification  # noqa: F401
    from backbones import vit_forward_flops
    cfg = Config.fromfile(osp.join(REPO, case['config']))
    cfg.model.backbone.pretrained = None
    if smoke:
        cfg.model.backbone.update(preset='internvit_tiny', dtype=None)
    model = MODELS.build(cfg.model).to(device).eval()
    images = torch.randn(case['batch'], 3, case['img_size'], case['img_size'], device=device)
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    iters = 1 if smoke else 10
    with torch.inference_mode():
        for _ in range(1 if smoke else 3):
            model.summaries(images)
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            model.summaries(images)
        sync()
    seconds = (time.perf_counter() - start) / iters
    flops = vit_forward_flops(model.backbone.arch, case['img_size'], case['img_size']) * case['batch']
    return dict(images_per_s=case['batch'] / seconds, tflops=flops / seconds / 1e12, peak_memory_gib=peak_gib(device))


def peak_gib(device: str) -> float:
    import torch
    if device == 'cuda':
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


RUNNERS = {'backbone': run_backbone, 'segmentation': run_segmentation, 'probe': run_probe}


def markdown(report: dict) -> str:
    lines = [f"# Benchmarks on {report['device_name']} (torch {report['torch']}, {report['started']})", '',
             '| case | images/s | TFLOP/s | peak memory GiB | note |', '|---|---|---|---|---|']
    for row in report['cases']:
        if 'images_per_s' in row:
            note = f"{row['iters_per_s']:.2f} it/s" if 'iters_per_s' in row else ''
            if row.get('compile'):
                note = f"first step (compiles) {row['first_step_seconds']:.1f} s"
            lines.append(f"| {row['name']} | {row['images_per_s']:.3g} | {row['tflops']:.3g} | "
                         f"{row['peak_memory_gib']:.3g} | {note} |")
        else:
            lines.append(f"| {row['name']} | - | - | - | {row.get('skipped') or row.get('error')} |")
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--out', default=osp.join('work_dirs', 'gpu_benchmarks'), help='folder for the JSON and table')
    p.add_argument('--wheels', default=osp.join(REPO, '.whl'), help='carried wheels for missing mm* packages')
    p.add_argument('--budget-s', type=float, default=420, help='start no case after this many seconds')
    p.add_argument('--only', nargs='+', help='run only cases whose name contains one of these texts')
    p.add_argument('--cpu-smoke', action='store_true', help='every case at a tiny size on the CPU')
    args = p.parse_args(argv)
    import torch  # after parsing: --help answers at once
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print('gpu_benchmarks: no CUDA device; nothing run, nothing written (--cpu-smoke runs tiny cases on the '
              'CPU)')
        return 0
    device = 'cpu' if args.cpu_smoke else 'cuda'
    print(install_mm_packages(args.wheels), flush=True)
    started = time.strftime('%Y-%m-%d %H:%M:%S')
    report = SimpleNamespace(device_name=torch.cuda.get_device_name() if device == 'cuda' else 'cpu (smoke)',
                             torch=torch.__version__, started=started, cases=[]).__dict__
    t0 = time.perf_counter()
    for case in cases(args.cpu_smoke):
        if args.only and not any(text in case['name'] for text in args.only):
            continue
        row = dict(case)
        reason = skip_reason(case, args.cpu_smoke)
        if reason is None and time.perf_counter() - t0 > args.budget_s:
            reason = f'time budget of {args.budget_s:.0f} s spent'
        if reason:
            row['skipped'] = reason
        else:
            print(f'== {case["name"]}', flush=True)
            try:
                row.update(RUNNERS[case['kind']](case, device, args.cpu_smoke))
            except Exception as err:  # one failing case must not cost the others' figures
                traceback.print_exc()
                row['error'] = f'{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ""}'
            if device == 'cuda':
                torch.cuda.empty_cache()
        row['device_name'] = report['device_name']
        report['cases'].append(row)
    report['seconds'] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    stem = osp.join(args.out, 'gpu_benchmarks_' + started.replace(' ', '_').replace(':', ''))
    with open(stem + '.json', 'x') as f:  # a new name per run: earlier results are never overwritten
        json.dump(report, f, indent=1, default=str)
    table = markdown(report)
    with open(stem + '.md', 'x') as f:
        f.write(table)
    print(table)
    print(f'written: {stem}.json, {stem}.md ({report["seconds"]:.0f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
