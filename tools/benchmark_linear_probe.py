"""Backbone cost of a full linear probe over 13 learning rates, three ways, measured in one run.

    python tools/benchmark_linear_probe.py [--epochs 10] [--classes 10 --train-per-class 50] [--threads 1]

(a) the published recipe run once per learning rate (13 trainings, features computed on the fly every epoch);
(b) the one-pass sweep: one training with 13 heads sharing each batch's backbone pass;
(c) the cached sweep: features extracted once into the feature cache, the 13 heads trained from disk
    (and (c) again: a second run that reuses the cache).

Every variant is a real MMEngine run of configs/classification/internvit_tiny_linear_probe*_synthetic.py (tiny
random InternViT, synthetic ImageNet made in a temporary folder, feature choice cls_mean, held-out selection
after every epoch, validation after the last). Backbone images are counted by the model itself
(``LinearProbe.backbone_images_processed``: training, held-out scoring, validation and cache extraction);
FLOPs are ``backbones.vit_forward_flops`` per image. Targets: (b) <= 1/10 of (a)'s backbone compute, (c) <= 1/100.
The last lines extrapolate the same counts to IN-1K with InternViT-6B-224px.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import shutil
import sys
import tempfile
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = osp.join(REPO, 'configs', 'classification')
LRS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def run_probe(config: str, work_dir: str, tag: str, options: dict):
    """One training run; returns (backbone images, seconds, held-out top-1 of the selected head)."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    cfg = Config.fromfile(osp.join(CONFIGS, config))
    cfg.merge_from_dict(options)
    cfg.work_dir = osp.join(work_dir, tag)
    cfg.experiment_name = f'benchmark_{tag}'
    cfg.default_hooks.logger.interval = 10 ** 6  # quiet
    cfg.log_level = 'WARNING'
    start = time.perf_counter()
    runner = Runner.from_cfg(cfg)
    runner.train()
    seconds = time.perf_counter() - start
    print(f'{tag}: {runner.model.backbone_images_processed} backbone images, {seconds:.1f} s', file=sys.stderr)
    model = runner.model
    heldout = max(h['heldout_top1'] for h in model.selection['heads']) if model.selection else float('nan')
    return model.backbone_images_processed, seconds, heldout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--epochs', type=int, default=10, help='epochs per training (published: 10)')
    parser.add_argument('--classes', type=int, default=10)
    parser.add_argument('--train-per-class', type=int, default=50)
    parser.add_argument('--val-per-class', type=int, default=5)
    parser.add_argument('--threads', type=int, default=1, help='torch threads (1 is fastest for a tiny model)')
    parser.add_argument('--work-dir', default=None, help='keep data and runs here (default: a temporary dir)')
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)

    import runpy

    from mmengine.logging import MMLogger

    import backbones
    import classification  # noqa: F401
    make_synthetic = runpy.run_path(osp.join(REPO, 'tools', 'make_synthetic_imagenet.py'))['main']

    MMLogger.get_instance('mmengine', log_level='WARNING')
    root = args.work_dir or tempfile.mkdtemp(prefix='benchmark_linear_probe_')
    os.makedirs(root, exist_ok=True)
    os.chdir(root)  # the configs read data/synthetic_imagenet and write work_dirs/ relative to here
    data = osp.join('data', 'synthetic_imagenet')
    if not osp.isdir(data):
        make_synthetic([data, '--classes', str(args.classes), '--train-per-class', str(args.train_per_class),
                        '--val-per-class', str(args.val_per_class)])
    e = args.epochs
    schedule = dict(
        train_cfg=dict(max_epochs=e, val_interval=e),
        param_scheduler=[dict(type='TimmCosineLR', t_initial=e, warmup_t=1 if e > 1 else 0, by_epoch=True,
                              convert_to_iter_based=True)],
        model=dict(num_classes=args.classes))
    sweep = dict(model=dict(num_classes=args.classes, sweep=True, sweep_lrs=list(LRS), sweep_features=['cls_mean']))

    rows = []
    images, seconds, best = 0, 0.0, []
    for i, lr in enumerate(LRS):
        n, s, h = run_probe('internvit_tiny_linear_probe_synthetic.py', root, f'a_lr{lr:g}',
                            dict(schedule, model=dict(num_classes=args.classes, lr=lr, sweep=False)))
        images, seconds = images + n, seconds + s
        best.append(h)
    rows.append(('(a) published recipe x 13 lrs', images, seconds, max(best)))
    n, s, h = run_probe('internvit_tiny_linear_probe_synthetic.py', root, 'b_sweep', {**schedule, **sweep})
    rows.append(('(b) one-pass sweep, 13 heads', n, s, h))
    shutil.rmtree(osp.join('work_dirs', 'feature_cache'), ignore_errors=True)  # (c) starts without a cache
    cache_opts = {**schedule, **sweep}
    for name, tag in (('(c) cached sweep, 13 heads', 'c_cached'), ('(c) again, cache reused', 'c_reused')):
        n, s, h = run_probe('internvit_tiny_linear_probe_sweep_cached_synthetic.py', root, tag, cache_opts)
        rows.append((name, n, s, h))

    arch = backbones.resolve_arch('internvit_tiny')
    flops = backbones.vit_forward_flops(arch, 56, 56)
    base = rows[0][1]
    print(f'\nLinear probe cost, 13 learning rates, {e} epochs; tiny InternViT ({flops / 1e6:.2f} MFLOP/image at '
          f'56 px), synthetic ImageNet {args.classes} classes x {args.train_per_class} train images; '
          f'CPU, {torch.get_num_threads()} thread(s)')
    print('| variant | backbone images | backbone GFLOP | vs (a) | wall s | best held-out top-1 |')
    print('|---|---|---|---|---|---|')
    for name, n, s, h in rows:
        ratio = f'1/{base / n:.0f}' if n else '0'
        print(f'| {name} | {n} | {n * flops / 1e9:.3f} | {ratio} | {s:.1f} | {h:.1f} |')
    b_ok, c_ok = rows[1][1] * 10 <= base, rows[2][1] * 100 <= base
    print(f'targets: (b) <= 1/10 of (a): {"met" if b_ok else "MISSED"}; (c) <= 1/100 of (a): '
          f'{"met" if c_ok else "MISSED"}')

    # The same bookkeeping for IN-1K with InternViT-6B-224px (1% held out, 50k val images).
    big = backbones.resolve_arch('internvit_6b_224')
    big_flops = backbones.vit_forward_flops(big, 224, 224)
    n_train, n_held, n_val = 1_281_167 - 12_812, 12_812, 50_000
    per_run = e * (n_train + n_held) + n_val  # training + held-out scoring each epoch + final validation
    counts = [('(a)', 13 * per_run), ('(b)', per_run), ('(c)', n_train + n_held + n_val)]
    print('IN-1K, InternViT-6B-224px (counted the same way): ' + ', '.join(
        f'{k} {v / 1e6:.2f}M images = {v * big_flops / 1e18:.0f} EFLOP' for k, v in counts))
    return 0 if (b_ok and c_ok) else 1


if __name__ == '__main__':
    sys.exit(main())
