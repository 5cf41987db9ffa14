"""What ``tools/train.py`` and ``tools/test.py`` do to a config before building a runner (any config of the project).

- work dir: ``--work-dir``, else the config's ``work_dir``, else ``work_dirs/<config name>``;
- ``--amp``: ``AmpOptimWrapper`` in bf16 where the GPU supports it (fp16 with dynamic loss scaling otherwise);
- without CUDA (CPU runs, the tests): AMP is turned off, bf16/fp16 InternViT backbones run in fp32, distributed
  runs use gloo and CPU model wrappers -- each change is logged;
- the runner: ``Runner``, or the config's ``runner_type`` (``FlexibleRunner`` for FSDP / DeepSpeed strategies),
  which loads ``load_from`` (and the checkpoint of ``tools/test.py``) strictly, in the project's names or the
  published segmentor layout (``mm_adapter.strict_loading``; ``allow_partial_load=True`` in the config for a
  deliberate partial load);
- the checkpoint hook deletes outdated checkpoints only after the new one is complete, and checkpoints hold the
  random states for an exact resume (``mm_adapter.run_safety``); a resume keeps the config's parameter schedules
  and takes only their position from the checkpoint (``mm_adapter.schedule_resume``).
"""
from __future__ import annotations

import logging
import os
import os.path as osp
from typing import Any, Optional

import torch
from mmengine.config import Config
from mmengine.logging import print_log

from backbones.dtypes import as_dtype

from .atomic_io import install_atomic_local_backend
from .compat import trust_checkpoints_in


def _note(message: str) -> None:
    print_log(message, logger='current')


def cfg_options(pairs: list[str] | None) -> dict:
    """``--cfg-options k=v ...`` as MMEngine's ``DictAction`` reads them (the tools parse their arguments before
    importing MMEngine, so that ``--help`` answers at once)."""
    import argparse

    from mmengine.config import DictAction
    namespace = argparse.Namespace(cfg_options={})
    if pairs:
        DictAction(option_strings=['--cfg-options'], dest='cfg_options')(None, namespace, pairs)
    return namespace.cfg_options


def default_work_dir(config_path: str) -> str:
    return osp.join('work_dirs', osp.splitext(osp.basename(config_path))[0])


def _is_flexible(cfg: Config) -> bool:
    return cfg.get('runner_type') == 'FlexibleRunner'


def _strategy_type(cfg: Config) -> Optional[str]:
    strategy = cfg.get('strategy')
    return strategy.get('type') if isinstance(strategy, dict) else None


def enable_amp(cfg: Config) -> None:
    wrapper = cfg.optim_wrapper
    if wrapper.get('type') in ('AmpOptimWrapper', 'DeepSpeedOptimWrapper'):
        return
    if wrapper.get('type', 'OptimWrapper') != 'OptimWrapper':
        raise ValueError(f"--amp replaces optim_wrapper.type 'OptimWrapper'; this config uses {wrapper['type']!r}")
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    wrapper['type'] = 'AmpOptimWrapper'
    wrapper['dtype'] = 'bfloat16' if bf16 else 'float16'
    wrapper.setdefault('loss_scale', 'dynamic')
    if _strategy_type(cfg) in ('FSDPStrategy', 'InternViTFSDPStrategy'):
        wrapper['use_fsdp'] = True


def _is_half(dtype) -> bool:
    try:
        return as_dtype(dtype) in (torch.bfloat16, torch.float16)
    except ValueError:
        return False  # a bad name is reported by the model when it is built


def _internvit_nodes(node: Any, path: str = 'model'):
    """Yield (path, dict) for every InternViT config dict."""
    if isinstance(node, dict):
        if node.get('type') == 'InternViT':
            yield path, node
        for key, value in node.items():
            yield from _internvit_nodes(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _internvit_nodes(value, f'{path}[{i}]')


def _half_backbones(node: Any, path: str = 'model'):
    """Yield (path, dict) for every InternViT config dict with a half dtype."""
    return ((p, n) for p, n in _internvit_nodes(node, path) if _is_half(n.get('dtype')))


def skip_pretrained_held_by(cfg: Config, checkpoint: str) -> None:
    """A checkpoint that holds the backbone (``backbone.*``; strict loading then sets every backbone tensor) makes
    the config's ``pretrained`` backbone file unnecessary: it is not read, so evaluating a segmentor file needs no
    ``pretrained/`` download. Checkpoints without the backbone (linear-probe heads) keep it."""
    if not osp.isfile(checkpoint):
        return
    from backbones.layouts import WeightsError

    from .strict_loading import read_checkpoint
    try:
        state_dict, _ = read_checkpoint(checkpoint)  # memory-mapped: only the key names are needed
    except WeightsError:
        return  # e.g. the published probe head (a yacs config beside it): the runner's own loader reads it
    if not any(key.startswith('backbone.') for key in state_dict):
        return
    for path, backbone in _internvit_nodes(cfg.get('model', {})):
        if backbone.get('pretrained'):
            _note(f'{checkpoint} holds the backbone: {path}.pretrained ({backbone["pretrained"]}) is not read')
            backbone['pretrained'] = None


def adapt_to_cpu(cfg: Config) -> None:
    """Make a GPU config run on the CPU: fp32 throughout, gloo, CPU model wrappers."""
    wrapper = cfg.get('optim_wrapper')
    if isinstance(wrapper, dict) and wrapper.get('type') == 'AmpOptimWrapper':
        for key in ('dtype', 'loss_scale', 'use_fsdp'):
            wrapper.pop(key, None)
        wrapper['type'] = 'OptimWrapper'
        _note('No CUDA: AmpOptimWrapper replaced by OptimWrapper (fp32 training on the CPU)')
    for path, backbone in _half_backbones(cfg.get('model', {})):
        _note(f'No CUDA: {path}.dtype {backbone["dtype"]} -> float32 (plain fp32 on the CPU)')
        backbone['dtype'] = None
    if _strategy_type(cfg) in ('DeepSpeedStrategy', 'InternViTDeepSpeedStrategy'):
        adapt_deepspeed_to_cpu(cfg.strategy)
    if cfg.get('launcher', 'none') != 'none':
        env = cfg.setdefault('env_cfg', {})
        env.setdefault('dist_cfg', {})['backend'] = 'gloo'
        if _is_flexible(cfg):
            strategy = cfg.setdefault('strategy', dict(type='DDPStrategy'))
            if strategy.get('type', 'DDPStrategy') == 'DDPStrategy':
                strategy.setdefault('model_wrapper', dict(type='MMDistributedDataParallel'))['device_ids'] = None
        else:
            model_wrapper = cfg.get('model_wrapper_cfg') or dict(type='MMDistributedDataParallel')
            model_wrapper.setdefault('broadcast_buffers', False)
            model_wrapper['device_ids'] = None  # DDP on CPU tensors
            cfg.model_wrapper_cfg = model_wrapper
        if cfg.get('sync_bn'):
            _note('No CUDA: sync_bn disabled (SyncBatchNorm needs GPUs)')
            cfg.sync_bn = None


def adapt_deepspeed_to_cpu(strategy: dict) -> None:
    """A DeepSpeed strategy's config (``strategy``, changed in place) and DeepSpeed itself made to run on the CPU."""
    skip_deepspeed_shm_comm_op()
    gather_zero3_parameters_one_by_one(strategy)


def skip_deepspeed_shm_comm_op() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce op (C++ JIT, minutes, needs a compiler) when its
    process group starts; it serves only inference all-reduce, which training never calls. Marked unavailable here,
    DeepSpeed falls back to torch.distributed (gloo)."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    _note('No CUDA: DeepSpeed shared-memory comm op not built (torch.distributed gloo collectives instead)')


def gather_zero3_parameters_one_by_one(strategy: dict) -> None:
    """ZeRO-3 on the CPU: ``zero_optimization.stage3_allgather_sequential=True`` in a DeepSpeed strategy's config
    (kept if the config sets it). DeepSpeed 0.19's blocking gather of several parameters at once
    (``Init._allgather_params_coalesced``: persistent parameters after a checkpoint load or save, the consolidated
    weights file) waits on its last collective only, enough where collectives finish in order on one CUDA stream;
    gloo finishes them on a pool of threads, so the other parameters could be read before they arrived (seen: a
    resumed run trained on, and saved, uninitialised values such as 7e24). The sequential gather waits on each."""
    holders = [strategy, strategy.get('config')]
    zero = next((h['zero_optimization'] for h in holders
                 if isinstance(h, dict) and isinstance(h.get('zero_optimization'), dict)), None)
    if zero is None or zero.get('stage') != 3:
        return
    if 'stage3_allgather_sequential' not in zero:
        zero['stage3_allgather_sequential'] = True
        _note('No CUDA: DeepSpeed ZeRO-3 gathers parameters one at a time (stage3_allgather_sequential=True; its '
              'gather of several at once can read them before gloo delivers them)')
    elif not zero['stage3_allgather_sequential']:
        print_log('stage3_allgather_sequential=False on the CPU: DeepSpeed 0.19 may read parameters gathered '
                  'with gloo before they arrive (see mm_adapter.runtime.gather_zero3_parameters_one_by_one)',
                  logger='current', level=logging.WARNING)


def prepare_config(cfg: Config, config_path: str, work_dir: Optional[str] = None, launcher: str = 'none',
                   amp: bool = False, resume: Optional[str] = None) -> Config:
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = default_work_dir(config_path)
    cfg.work_dir = osp.abspath(cfg.work_dir)
    if amp:
        enable_amp(cfg)
    if resume is not None:
        cfg.resume = True
        cfg.load_from = None if resume == 'auto' else resume
    tie_schedule_to_max_iters(cfg)
    if not torch.cuda.is_available():
        adapt_to_cpu(cfg)
    from .run_safety import install_run_safety
    install_run_safety(cfg)  # rotation after the new checkpoint is written; random states saved for exact resume
    return cfg


def tie_schedule_to_max_iters(cfg: Config) -> None:
    """Schedulers that end at the config's own ``max_iters`` follow ``train_cfg.max_iters`` when it is changed (e.g.
    ``--cfg-options train_cfg.max_iters=1000``): the schedule still ends with the training."""
    planned, actual = cfg.get('max_iters'), (cfg.get('train_cfg') or {}).get('max_iters')
    if not isinstance(planned, int) or not isinstance(actual, int) or planned == actual:
        return
    schedulers = cfg.get('param_scheduler') or []
    for scheduler in schedulers if isinstance(schedulers, (list, tuple)) else [schedulers]:
        if isinstance(scheduler, dict) and not scheduler.get('by_epoch', True) and scheduler.get('end') == planned:
            if scheduler.get('begin', 0) >= actual:
                _note(f"{scheduler.get('type')} begins at iteration {scheduler.get('begin')}, after "
                      f"train_cfg.max_iters={actual}: it never acts in this run (shorten the warm-up with "
                      f"param_scheduler.0.end=N param_scheduler.1.begin=N)")
                continue
            scheduler['end'] = actual
            _note(f"{scheduler.get('type')}: end {planned} -> {actual} (follows train_cfg.max_iters)")


def slurm_to_torch_env() -> None:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from Slurm's variables (as MMEngine's slurm launcher
    sets them); MASTER_ADDR, when not set, is the first host of SLURM_NODELIST."""
    missing = [k for k in ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST') if k not in os.environ]
    if missing:
        raise RuntimeError(f'--launcher slurm needs {", ".join(missing)} in the environment: run it under srun '
                           f'(tools/slurm_train.sh)')
    os.environ['RANK'] = os.environ['SLURM_PROCID']
    os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
    os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')
    os.environ.setdefault('MASTER_PORT', '29500')
    if 'MASTER_ADDR' not in os.environ:
        import subprocess
        nodes = os.environ['SLURM_NODELIST']
        try:
            first = subprocess.run(['scontrol', 'show', 'hostnames', nodes], capture_output=True,
                                   text=True).stdout.split()
        except OSError:  # no scontrol here: a plain host list
            first = []
        os.environ['MASTER_ADDR'] = first[0] if first else nodes.split(',')[0]


def init_distributed_without_cuda(launcher: str) -> None:
    """MMEngine's pytorch and slurm launchers call ``torch.cuda.set_device``; without CUDA the gloo group is made
    here (the slurm launcher's variables are translated first)."""
    if launcher == 'none' or torch.cuda.is_available():
        return
    if launcher not in ('pytorch', 'slurm'):
        raise RuntimeError(f'launcher {launcher!r} needs CUDA; on the CPU use --launcher pytorch (torchrun) or slurm')
    if launcher == 'slurm':
        slurm_to_torch_env()
    import torch.distributed as torch_dist
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend='gloo', rank=int(os.environ['RANK']),
                                      world_size=int(os.environ['WORLD_SIZE']))


def cache_config_formatting() -> None:
    """MMEngine formats the whole config with yapf (``Config.pretty_text``) when the runner logs and dumps it and
    again for the meta of every checkpoint, the same text each time (0.3-2 s a call on the CPU, a fifth of a tiny
    distributed test run's CPU time). The formatting is memoised on its input, so the output is unchanged."""
    import mmengine.config.config as config_module
    format_code = config_module.FormatCode
    if getattr(format_code, 'memoised', False):
        return
    recent: dict = {}

    def memoised_format_code(text, **kwargs):
        key = (text, repr(sorted(kwargs.items())))
        if key not in recent:
            if len(recent) >= 4:  # a few configs per process at most: keep the latest
                recent.pop(next(iter(recent)))
            recent[key] = format_code(text, **kwargs)
        return recent[key]

    memoised_format_code.memoised = True
    config_module.FormatCode = memoised_format_code


def build_runner(cfg: Config):
    from .run_safety import install_exact_resume
    from .schedule_resume import install_config_shaped_resume
    from .strict_loading import install_strict_loading, registered_converters
    install_atomic_local_backend()  # this run's checkpoints and last_checkpoint pointer are written atomically
    cache_config_formatting()
    if 'runner_type' in cfg:
        from mmengine.registry import RUNNERS
        runner = RUNNERS.build(cfg)
    else:
        from mmengine.runner import Runner
        runner = Runner.from_cfg(cfg)
    install_strict_loading(runner, allow_partial=bool(cfg.get('allow_partial_load', False)),
                           convert=registered_converters)
    install_config_shaped_resume(runner)  # --resume: the config's schedules, the checkpoint's position
    install_exact_resume(runner)  # every rank's random states in every checkpoint, under every strategy
    return runner


def trust_work_dir(cfg: Config) -> Optional[str]:
    """Full unpickling only to resume (``cfg.resume``), and then only checkpoints inside this run's work dir (see
    ``mm_adapter.compat``); ``load_from`` and everything else load with ``weights_only=True``, wherever they are."""
    return trust_checkpoints_in(cfg.work_dir if cfg.get('resume') else None)
