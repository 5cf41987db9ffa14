"""Train any config of the project with MMEngine (segmentation, classification).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [auto|CHECKPOINT]] [--overwrite] [--amp]
                             [--cfg-options k=v ...] [--launcher none|pytorch|slurm]
    bash tools/dist_train.sh CONFIG NGPUS [...]          # torchrun, --launcher pytorch

The runner is MMEngine's ``Runner``, or the config's ``runner_type`` (``FlexibleRunner`` with an FSDP or DeepSpeed
``strategy`` for full tuning of InternViT-6B). Without CUDA the run is adapted to the CPU (fp32, gloo); see
``mm_adapter/runtime.py``. Only ``--resume`` unpickles in full, and only checkpoints inside the work dir
(``mm_adapter.compat``); ``load_from`` always loads with ``weights_only=True``. A work dir that already holds a run is
only reused with ``--resume`` or ``--overwrite``; a run locks its work dir for its whole life (a second run there is
refused); checkpoints are written atomically and rotated only after the new one is complete; a resumed run repeats
the random draws of an uninterrupted one (``mm_adapter/run_safety.py``).
"""
import argparse
import contextlib
import os
import os.path as osp
import sys


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


def forget_previous_run(work_dir: str) -> None:
    """--overwrite: the old run's ``last_checkpoint`` goes at once, so that no later ``--resume`` continues the old
    run's checkpoints in place of this one's (its checkpoint files stay until rotated or overwritten)."""
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        os.unlink(pointer)


def checkpoint_to_resume(cfg) -> str:
    """The file ``--resume`` will read: the given one, or the one ``last_checkpoint`` names (which must exist)."""
    if cfg.get('load_from'):
        if not osp.isfile(cfg.load_from):
            what = 'is a directory' if osp.isdir(cfg.load_from) else 'does not exist'
            raise FileNotFoundError(f'--resume {cfg.load_from}: the checkpoint {what}')
        return cfg.load_from
    pointer = osp.join(cfg.work_dir, 'last_checkpoint')
    if not osp.isfile(pointer):
        raise FileNotFoundError(f'--resume: nothing to resume in {cfg.work_dir} (no last_checkpoint); start the run '
                                f'without --resume')
    with open(pointer) as f:
        latest = f.read().strip()
    if not osp.exists(latest):
        raise FileNotFoundError(f'--resume: {pointer} names {latest}, which does not exist; pass --resume with one '
                                f'of the checkpoints in {cfg.work_dir}')
    return latest


def _is_rank_zero() -> bool:
    """Rank 0 of the job, before any process group exists: torchrun sets RANK, srun sets SLURM_PROCID."""
    rank = os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0'))
    return int(rank) == 0


def main(argv=None):
    args = parse_args(argv)
    if not osp.isfile(args.config):
        raise FileNotFoundError(f'config file {args.config} does not exist')
    # MMEngine is imported once the arguments are parsed, so that --help answers at once.
    from mmengine.config import Config

    import mm_adapter  # noqa: F401  (mmcv.ops shim before mmseg, InternViT registration)
    from mm_adapter.compat import trust_checkpoints_in
    from mm_adapter.run_safety import WorkDirLock, check_cfg_options, finish_run
    from mm_adapter.runtime import (
        build_runner,
        cfg_options,
        init_distributed_without_cuda,
        prepare_config,
        trust_work_dir,
    )
    cfg = Config.fromfile(args.config)
    options = cfg_options(args.cfg_options)
    check_cfg_options(cfg, options)
    cfg.merge_from_dict(options)
    prepare_config(cfg, args.config, work_dir=args.work_dir, launcher=args.launcher, amp=args.amp,
                   resume=args.resume)
    # One run per work dir: rank 0 holds the lock for the whole run; the other ranks of a job share its dir.
    lock = WorkDirLock(cfg.work_dir) if _is_rank_zero() else contextlib.nullcontext()
    with lock:
        refuse_to_overwrite(cfg, args.overwrite)
        if cfg.get('resume'):
            checkpoint_to_resume(cfg)
        elif args.overwrite and _is_rank_zero():
            forget_previous_run(cfg.work_dir)
        init_distributed_without_cuda(args.launcher)
        runner = None
        try:
            runner = build_runner(cfg)
            trust_work_dir(cfg)  # full unpickling only for --resume, only inside the work dir
            runner.train()
        except BaseException:
            if args.launcher != 'none':
                finish_run(runner, synchronize=False)
            raise
        finally:
            trust_checkpoints_in(None)
        if args.launcher != 'none':
            finish_run(runner)  # data workers and the process group, explicitly (no SIGABRT at exit)
    return runner


def cli(argv=None) -> int:
    """``main`` with refusals (work dir in use or holding a run, missing files, bad options) as one-line errors."""
    try:
        main(argv)
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as err:
        from mm_adapter.run_safety import ConfigOptionError, WorkDirLockedError
        if not isinstance(err, (WorkDirLockedError, FileExistsError, FileNotFoundError, ConfigOptionError)):
            raise
        print(f'train.py: error: {err}', file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(cli())
