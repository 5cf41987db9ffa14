"""Train any config of the project with MMEngine (segmentation, classification).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [auto|CHECKPOINT]] [--overwrite] [--amp]
                             [--cfg-options k=v ...] [--launcher none|pytorch|slurm]
    bash tools/dist_train.sh CONFIG NGPUS [...]          # torchrun, --launcher pytorch

The runner is MMEngine's ``Runner``, or the config's ``runner_type`` (``FlexibleRunner`` with an FSDP or DeepSpeed
``strategy`` for full tuning of InternViT-6B). Without CUDA the run is adapted to the CPU (fp32, gloo); see
``mm_adapter/runtime.py``. Resuming unpickles only checkpoints inside the work dir (``mm_adapter.compat``). A work
dir that already holds a run is only reused with ``--resume`` or ``--overwrite``; checkpoints are written atomically.
"""
import argparse
import os
import os.path as osp


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a model with MMEngine')
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: work_dirs/<config name>)')
    parser.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CHECKPOINT',
                        help="resume: from the work dir's latest checkpoint (no value or 'auto') or a given one")
    parser.add_argument('--overwrite', action='store_true',
                        help='start a new run in a work dir that already holds one (its checkpoints are replaced)')
    parser.add_argument('--amp', action='store_true', help='mixed precision (bf16 where supported, else fp16)')
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='override config keys, e.g. train_cfg.max_iters=1000 model.backbone.dtype=None')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help='job launcher: pytorch under torchrun (dist_*.sh), slurm under srun (slurm_*.sh)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def refuse_to_overwrite(cfg, overwrite: bool) -> None:
    pointer = osp.join(cfg.work_dir, 'last_checkpoint')
    if cfg.get('resume') or overwrite or not osp.isfile(pointer):
        return
    with open(pointer) as f:
        latest = f.read().strip()
    raise FileExistsError(f'work dir {cfg.work_dir} already holds a run (latest checkpoint {latest}); pass --resume '
                          f'to continue it, --overwrite to start a new run there, or another --work-dir')


def main(argv=None):
    args = parse_args(argv)
    if not osp.isfile(args.config):
        raise FileNotFoundError(f'config file {args.config} does not exist')
    # MMEngine is imported once the arguments are parsed, so that --help answers at once.
    from mmengine.config import Config

    import mm_adapter  # noqa: F401  (mmcv.ops shim before mmseg, InternViT registration)
    from mm_adapter.runtime import (
        build_runner,
        cfg_options,
        init_distributed_without_cuda,
        prepare_config,
        trust_work_dir,
    )
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(cfg_options(args.cfg_options))
    prepare_config(cfg, args.config, work_dir=args.work_dir, launcher=args.launcher, amp=args.amp,
                   resume=args.resume)
    refuse_to_overwrite(cfg, args.overwrite)
    init_distributed_without_cuda(args.launcher)
    runner = build_runner(cfg)
    trust_work_dir(cfg)
    runner.train()
    return runner


if __name__ == '__main__':
    main()
