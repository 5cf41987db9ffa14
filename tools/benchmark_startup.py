"""Host memory of a full-tuning start-up per rank: today's (full model on every rank) vs the sharded one (meta device).

    python tools/benchmark_startup.py --preset internvit_300m_448                       # 300M, FSDP, 2 gloo ranks
    python tools/benchmark_startup.py --preset internvit_6b_224 --depth 4 --img-size 224   # 6B width, 4 blocks
    python tools/benchmark_startup.py --engine deepspeed ...  # DeepSpeed ZeRO-3 instead of FSDP
    python tools/benchmark_startup.py --random-init ...       # no pretrained checkpoint: random initialisation
    python tools/benchmark_startup.py --config CONFIG ...    # a config's whole model (neck, heads) around the backbone

Writes a random checkpoint of the model (safetensors, ``--checkpoint-dtype``; or uses ``--checkpoint``; none with
``--random-init``), then for each strategy starts ``--world-size`` processes (gloo, CPU) that do what
``FlexibleRunner`` does before training: build the model with ``pretrained=`` that checkpoint, initialise and
broadcast, and wrap it -- ``--engine fsdp``: with ``InternViTBlockFSDP`` (one unit per block, bf16 blocks) under

  * ``today``: MMEngine's ``FSDPStrategy`` (every rank builds and loads the full fp32 model, then shards it);
  * ``sharded``: ``InternViTFSDPStrategy`` (backbone on the meta device, each rank writes only its shards);

``--engine deepspeed``: with ``deepspeed.initialize`` (ZeRO-3, fp32, no optimizer: its fp32 partition copies are
training state, not start-up) under ``today``: MMEngine's ``DeepSpeedStrategy``, ``sharded``:
``InternViTDeepSpeedStrategy`` (backbone on the meta device, each rank writes only its partitions).

Each rank reports its peak resident set size during start-up (``VmHWM`` after wrapping minus the resident size
before building: imports and the Python/torch runtime are not counted), relative to the fp32 size of the whole model.
``--save-states DIR`` also writes each strategy's full state dict after wrapping (rank 0) as
``DIR/<engine>_<strategy>.pth``, for comparing them.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import socket
import subprocess
import sys
import tempfile
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
STRATEGIES = {'fsdp': {'today': 'FSDPStrategy', 'sharded': 'InternViTFSDPStrategy'},
              'deepspeed': {'today': 'DeepSpeedStrategy', 'sharded': 'InternViTDeepSpeedStrategy'}}
GiB = 1024 ** 3


def current_rss() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def peak_rss() -> int:
    # VmHWM: the peak of this process's own memory map. ru_maxrss would start at the parent's resident size at
    # fork (it is kept across exec), which is the benchmark's own process, not the rank's start-up.
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    raise RuntimeError('no VmHWM in /proc/self/status')


def model_config(args) -> dict:
    backbone = dict(type='InternViT', preset=args.preset, pretrained=None if args.random_init else args.checkpoint)
    backbone.update({k: getattr(args, k) for k in ('depth', 'img_size') if getattr(args, k)})
    if not args.config:
        return backbone
    from mmengine.config import Config
    cfg = Config.fromfile(args.config)
    cfg.model.backbone.update(backbone)
    return cfg.model.to_dict()


def worker(args) -> None:
    """One rank: what FlexibleRunner's strategy does before training, with the peak RSS around it."""
    import torch
    import torch.distributed as dist
    from mmengine.registry import STRATEGIES as REGISTRY
    from mmengine.registry import init_default_scope

    import segmentation  # noqa: F401  (registers InternViTBlockFSDP, InternViTFSDPStrategy)

    torch.set_num_threads(1)
    init_default_scope('mmseg')
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    if args.engine == 'fsdp':
        engine = dict(model_wrapper=dict(type='InternViTBlockFSDP', block_param_dtype='bfloat16'))
    else:
        engine = dict(zero_optimization=dict(stage=3), train_micro_batch_size_per_gpu=1)
        if not torch.cuda.is_available():
            from mm_adapter.runtime import adapt_deepspeed_to_cpu
            adapt_deepspeed_to_cpu(engine)
    with tempfile.TemporaryDirectory() as work_dir:
        strategy = REGISTRY.build(dict(
            type=STRATEGIES[args.engine][args.strategy], work_dir=work_dir, env_kwargs=dict(launcher='pytorch'),
            log_kwargs=dict(log_level='WARNING'), **engine))
        before = current_rss()
        start = time.perf_counter()
        torch.manual_seed(0)  # the runner seeds every rank alike before building
        model = strategy.build_model(model_config(args))
        deferred = sum(p.numel() for p in model.parameters() if p.is_meta)
        stages = dict(built=(current_rss() - before, peak_rss() - before))
        model = strategy._init_model_weights(model)
        stages['initialised'] = (current_rss() - before, peak_rss() - before)
        model = strategy._wrap_model(model)
        seconds = time.perf_counter() - start
        peak = peak_rss()
        stages['wrapped'] = (current_rss() - before, peak - before)
    state, numel = full_state(model, args.engine, gather=bool(args.save_states))
    if args.save_states and rank == 0:
        torch.save(state, osp.join(args.save_states, f'{args.engine}_{args.strategy}.pth'))
    result = dict(engine=args.engine, strategy=args.strategy, rank=rank, seconds=seconds, deferred_parameters=deferred,
                  rss_before=before, peak_rss=peak, model_fp32_bytes=numel * 4,
                  rss_and_peak_increase_by_stage=stages)
    with open(osp.join(args.results, f'{args.strategy}_rank{rank}.json'), 'w') as f:
        json.dump(result, f)
    dist.destroy_process_group()


def full_state(model, engine: str, gather: bool) -> tuple[dict | None, int]:
    """(the full state dict on rank 0 if ``gather``, else None; the number of model parameters)."""
    import torch
    import torch.distributed as dist
    if engine == 'deepspeed':
        import deepspeed
        params = list(model.parameters())
        numel = sum(p.ds_numel for p in params)
        if not gather:
            return None, numel
        with deepspeed.zero.GatheredParameters(params):
            state = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        return state, numel
    # FSDP: the sharded parameters add up to the model over the ranks
    numel = torch.tensor(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    dist.all_reduce(numel)
    if not gather:
        return None, int(numel.item())
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        state = model.state_dict()
    return state, int(numel.item())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def launch(args, strategy: str, results: str) -> list[dict]:
    env = dict(os.environ, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()), WORLD_SIZE=str(args.world_size),
               OMP_NUM_THREADS='1', PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    argv = [sys.executable, osp.abspath(__file__), '--worker', '--strategy', strategy, '--results', results,
            '--preset', args.preset, '--engine', args.engine]
    argv += ['--random-init'] if args.random_init else ['--checkpoint', args.checkpoint]
    for flag in ('depth', 'img_size', 'config', 'save_states'):
        if getattr(args, flag):
            argv += ['--' + flag.replace('_', '-'), str(getattr(args, flag))]
    procs = [subprocess.Popen(argv, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(args.world_size)]
    logs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        if proc.returncode:
            raise RuntimeError(f'{strategy} rank {rank} failed (exit {proc.returncode}):\n{log[-4000:]}')
    rows = []
    for rank in range(args.world_size):
        with open(osp.join(results, f'{strategy}_rank{rank}.json')) as f:
            rows.append(json.load(f))
    return rows


def write_checkpoint(args, path: str) -> None:
    import torch
    from safetensors.torch import save_file

    from backbones import InternViT
    from backbones.internvit import as_dtype
    torch.manual_seed(1)
    # at the preset's own grid, like a published checkpoint: a model with another --img-size resamples it
    model = InternViT(args.preset, **({'depth': args.depth} if args.depth else {}))
    dtype = as_dtype(args.checkpoint_dtype)
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--preset', default='internvit_300m_448')
    p.add_argument('--depth', type=int)
    p.add_argument('--img-size', type=int)
    p.add_argument('--config', help='build this config\'s model (segmentor) around the backbone')
    p.add_argument('--checkpoint', help='backbone checkpoint (default: a random one written to a temporary dir)')
    p.add_argument('--checkpoint-dtype', default='bfloat16', help='dtype of the written checkpoint (published: bf16)')
    p.add_argument('--engine', choices=list(STRATEGIES), default='fsdp', help='FSDP or DeepSpeed ZeRO-3')
    p.add_argument('--strategies', nargs='+', default=['today', 'sharded'], choices=['today', 'sharded'])
    p.add_argument('--random-init', action='store_true', help='no pretrained checkpoint: random initialisation')
    p.add_argument('--world-size', type=int, default=2)
    p.add_argument('--save-states', help='write each strategy\'s full state dict after wrapping here')
    p.add_argument('--timeout', type=int, default=1800)
    p.add_argument('--json', help='write all rows to this JSON file')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--strategy', help=argparse.SUPPRESS)
    p.add_argument('--results', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(prefix='startup_') as tmp:
        if not args.checkpoint and not args.random_init:
            args.checkpoint = osp.join(tmp, 'backbone.safetensors')
            write_checkpoint(args, args.checkpoint)
        rows = [row for strategy in args.strategies for row in launch(args, strategy, tmp)]
    what = args.preset + (f' depth {args.depth}' if args.depth else '') + (' + ' + osp.basename(args.config)
                                                                           if args.config else '')
    source = 'random initialisation' if args.random_init else f'checkpoint {args.checkpoint_dtype}'
    print(f'{args.engine} start-up, {what}, {args.world_size} gloo ranks on the CPU ({os.cpu_count()} cores), model '
          f'fp32 {rows[0]["model_fp32_bytes"] / GiB:.2f} GiB, {source}')
    print('| strategy | rank | peak RSS increase GiB | x fp32 model | seconds |')
    print('|---|---|---|---|---|')
    for r in rows:
        r['ratio'] = (r['peak_rss'] - r['rss_before']) / r['model_fp32_bytes']
        print(f"| {r['strategy']} | {r['rank']} | {(r['peak_rss'] - r['rss_before']) / GiB:.2f} | "
              f"{r['ratio']:.2f} | {r['seconds']:.1f} |")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == '__main__':
    main()
