"""Evaluate a checkpoint: prints mIoU, mAcc, aAcc and the per-class table; ``--show-dir`` writes overlay PNGs.

    python tools/test.py CONFIG CHECKPOINT [--show-dir DIR] [--max-overlays N] [--work-dir DIR] [--tta] [--out DIR]
                         [--cfg-options ...]
    bash tools/dist_test.sh CONFIG CHECKPOINT NGPUS [...]

Evaluation never unpickles a checkpoint in full: it loads with ``torch.load(weights_only=True)``, and an MMEngine
checkpoint (from this or any run) gives its tensors and plain metadata while its message-hub objects become inert
stand-ins (``backbones.reading.safe_torch_load``); a file holding any other object is refused.
"""
import argparse
import os
import os.path as osp


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (evaluate) a checkpoint with MMEngine')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where the logs go (default: work_dirs/<config name>)')
    parser.add_argument('--show-dir', help='write <image name>.png overlays (ground truth | prediction) here')
    parser.add_argument('--max-overlays', type=int, default=None, help='write at most this many overlays')
    parser.add_argument('--tta', action='store_true',
                        help="test-time augmentation: the config's tta_pipeline (multi-scale + flip) and tta_model")
    parser.add_argument('--out', help='also write the predicted label maps as <image name>.png here')
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE', help='override config keys')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help='job launcher: pytorch under torchrun (dist_*.sh), slurm under srun (slurm_*.sh)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def use_tta(cfg, config_path: str) -> None:
    """mmseg 1.x test-time augmentation: the test data go through ``tta_pipeline``, the model is wrapped in
    ``tta_model`` (which merges the views' predictions)."""
    missing = [key for key in ('tta_model', 'tta_pipeline') if key not in cfg]
    if missing:
        raise KeyError(f'--tta needs {" and ".join(missing)} in {config_path} (see configs/_base_/datasets/)')
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    cfg.tta_model.module = cfg.model
    cfg.model = cfg.tta_model


def sweep_of_the_run(cfg, config_path: str, checkpoint: str) -> None:
    """A probe sweep's checkpoint holds every head of the sweep: when the run's own dumped config (beside the
    checkpoint, as MMEngine writes it) says ``model.sweep``, the test uses the same switch (logged)."""
    dumped = osp.join(osp.dirname(osp.abspath(checkpoint)), osp.basename(config_path))
    model = cfg.get('model')
    if not osp.isfile(dumped) or not isinstance(model, dict) or 'sweep' not in model:
        return
    from backbones.run_config import assigned_value
    with open(dumped) as f:
        run_model = assigned_value(f.read(), 'model')  # parsed, never executed
    run_sweep = run_model.get('sweep') if isinstance(run_model, dict) else None
    if isinstance(run_sweep, bool) and run_sweep != model['sweep']:
        print(f'tools/test.py: model.sweep={run_sweep} as in the run that wrote the checkpoint ({dumped})', flush=True)
        model['sweep'] = run_sweep


def main(argv=None):
    args = parse_args(argv)
    for path, what in ((args.config, 'config'), (args.checkpoint, 'checkpoint')):
        if osp.isdir(path):
            raise IsADirectoryError(f'{what} {path} is a directory, not a {what} file')
        if not osp.isfile(path):
            raise FileNotFoundError(f'{what} file {path} does not exist')
    # MMEngine is imported once the arguments are parsed, so that --help answers at once.
    from mmengine.config import Config

    import mm_adapter  # noqa: F401  (mmcv.ops shim before mmseg, InternViT registration)
    from mm_adapter.compat import trust_checkpoints_in
    from mm_adapter.run_safety import check_cfg_options, finish_run
    from mm_adapter.runtime import (
        build_runner,
        cfg_options,
        init_distributed_without_cuda,
        prepare_config,
        skip_pretrained_held_by,
    )
    cfg = Config.fromfile(args.config)
    sweep_of_the_run(cfg, args.config, args.checkpoint)
    options = cfg_options(args.cfg_options)
    check_cfg_options(cfg, options)
    cfg.merge_from_dict(options)  # an explicit model.sweep=... still wins
    prepare_config(cfg, args.config, work_dir=args.work_dir, launcher=args.launcher)
    cfg.load_from = args.checkpoint
    cfg.resume = False
    skip_pretrained_held_by(cfg, args.checkpoint)
    if args.tta:
        use_tta(cfg, args.config)
    if args.out:  # as mmseg's tools/test.py: IoUMetric writes the label maps
        cfg.test_evaluator['output_dir'] = osp.abspath(args.out)
        cfg.test_evaluator['keep_results'] = True
    if args.show_dir:
        cfg.visualizer = dict(type='SegLocalVisualizer', vis_backends=[dict(type='LocalVisBackend')],
                              save_dir=osp.join(cfg.work_dir, 'vis'))
        cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [
            dict(type='SegOverlayHook', out_dir=osp.abspath(args.show_dir), max_images=args.max_overlays)]
    init_distributed_without_cuda(args.launcher)
    runner = None
    try:
        runner = build_runner(cfg)
        trust_checkpoints_in(None)  # nothing to resume here, so no file needs full unpickling
        metrics = runner.test()
    except BaseException:
        if args.launcher != 'none':
            finish_run(runner, synchronize=False)
        raise
    if args.launcher != 'none':
        finish_run(runner)  # data workers and the process group, explicitly (no SIGABRT at exit)
    return metrics


if __name__ == '__main__':
    main()
