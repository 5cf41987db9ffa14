"""What keeps a training run's files whole and its resume exact (``tools/train.py`` uses all of it).

- :class:`WorkDirLock`: one run per work dir. ``{work_dir}/.train.lock`` holds the pid, host, start time and command
  of the run that owns the dir; a second run is refused naming the first. A lock whose process is gone (same host,
  pid not running or running since another time) is reported and taken over; a lock from another host cannot be
  checked from here and is refused with what to delete.
- :class:`SafeCheckpointHook`: MMEngine's ``CheckpointHook`` deletes the outdated checkpoint *before* writing the
  new one (``max_keep_ckpts``), so a kill during the write leaves none, and ``last_checkpoint`` is rewritten in
  place. Here the new checkpoint is written (atomically, ``mm_adapter.atomic_io``), then ``last_checkpoint``
  (atomically), and only then are outdated checkpoints deleted: ``last_checkpoint`` always names a complete file.
  Its extra keyword arguments (passed on to ``runner.save_checkpoint``) are checked when it is built, so a typo
  such as ``intervall=1`` stops the run at start, not at the first checkpoint.
- :class:`ExactResumeHook`: checkpoints also store the torch (CPU and CUDA), numpy and python random states; on
  ``--resume`` they are restored after MMEngine has replayed the data loader up to the checkpoint's iteration (the
  sampler position, and the data workers' random streams with it), so a resumed run draws the same random numbers
  as an uninterrupted one. Validation runs with the training states saved and put back, so whether it ran between
  the checkpoint and the next iteration does not matter. On resume it also checks that the checkpoint's tensors
  fit the model of the config, naming the ones that differ.
- :func:`install_run_safety`: puts the two hooks into a config (``prepare_config`` calls it).
- :func:`check_cfg_options`: refuses ``--cfg-options`` keys that nothing reads (a top-level config variable such
  as ``max_iters`` was already copied where it is used when the file was read).
- :func:`finish_run`: stops data workers and the process group explicitly at the end of a run.
"""
from __future__ import annotations

import inspect
import json
import os
import os.path as osp
import random
import socket
import sys
import time
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch
from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

from backbones.loading import describe_mismatch

from .atomic_io import AtomicLocalBackend

LOCK_NAME = '.train.lock'


# ------------------------------------------------------------------------------------------------- work-dir lock
class WorkDirLockedError(RuntimeError):
    """Another run holds the work dir."""


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (Linux), to tell a live run from a reused pid; None where unknown."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _is_running(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    now = _process_start(pid)
    return start is None or now is None or now == start


class WorkDirLock:
    """Exclusive ownership of a work dir for one run (see the module docstring). Use as a context manager."""

    def __init__(self, work_dir: str):
        self.work_dir = work_dir
        self.path = osp.join(work_dir, LOCK_NAME)
        self.held = False

    def _describe(self, holder: Mapping[str, Any]) -> str:
        return (f"process {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}: "
                f"{holder.get('command')})")

    def acquire(self) -> 'WorkDirLock':
        os.makedirs(self.work_dir, exist_ok=True)
        me = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.strftime('%Y-%m-%d %H:%M:%S'),
              'process_start': _process_start(os.getpid()), 'command': ' '.join(sys.argv)}
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, 'w') as f:
                json.dump(me, f)
            self.held = True
            return self

    def _take_over_if_stale(self) -> None:
        try:
            with open(self.path) as f:
                holder = json.load(f)
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError) as err:
            raise WorkDirLockedError(f'work dir {self.work_dir} is locked by {self.path}, which cannot be read '
                                     f'({err}); delete it if no run is using this work dir') from None
        if holder.get('host') != socket.gethostname():
            raise WorkDirLockedError(
                f'work dir {self.work_dir} is in use by another run: {self._describe(holder)}. Whether that run is '
                f'still alive cannot be checked from this host; if it has stopped, delete {self.path}')
        if _is_running(int(holder.get('pid', -1)), holder.get('process_start')):
            raise WorkDirLockedError(f'work dir {self.work_dir} is in use by another run: {self._describe(holder)}; '
                                     f'wait for it to finish or use another --work-dir')
        print_log(f'work dir {self.work_dir}: stale lock {self.path} of {self._describe(holder)}, which is no longer '
                  f'running (killed or crashed); taking the work dir over', logger='current', level=30)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> 'WorkDirLock':
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------------- rotation
def _save_checkpoint_parameters() -> set:
    from mmengine.runner import FlexibleRunner, Runner
    names = set()
    for runner_cls in (Runner, FlexibleRunner):
        names |= set(inspect.signature(runner_cls.save_checkpoint).parameters)
    return names - {'self', 'out_dir', 'filename'}


@HOOKS.register_module(force=True)
class SafeCheckpointHook(CheckpointHook):
    """``CheckpointHook`` that deletes outdated checkpoints only after the new one and ``last_checkpoint`` are
    written, and checks its extra arguments when built (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # CheckpointHook passes these itself; anything else goes to runner.save_checkpoint, which must accept it.
        passed = {'file_client_args', 'save_optimizer', 'save_param_scheduler', 'meta', 'by_epoch', 'backend_args'}
        accepted = _save_checkpoint_parameters() - passed
        unknown = sorted(set(self.args) - accepted)
        if unknown:
            known = sorted(set(inspect.signature(CheckpointHook.__init__).parameters) - {'self', 'kwargs'})
            raise TypeError(f'default_hooks.checkpoint: unknown argument(s) {", ".join(unknown)}; CheckpointHook '
                            f'takes {", ".join(known)}')

    def _save_checkpoint_with_step(self, runner, step, meta):
        outdated = []
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                outdated.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        runner.save_checkpoint(self.out_dir, ckpt_filename, self.file_client_args,
                               save_optimizer=self.save_optimizer, save_param_scheduler=self.save_param_scheduler,
                               meta=meta, by_epoch=self.by_epoch, backend_args=self.backend_args, **self.args)
        if not is_main_process():
            return
        AtomicLocalBackend().put_text(self.last_ckpt, osp.join(runner.work_dir, 'last_checkpoint'))
        for old in outdated:  # only now: the new checkpoint is complete and last_checkpoint names it
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old))
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):  # DeepSpeed checkpoints are directories
                self.file_backend.rmtree(path)


# ------------------------------------------------------------------------------------------------- exact resume
def random_states() -> dict:
    """torch (CPU, and every CUDA device), numpy and python random states, as tensors and plain Python values
    (so a checkpoint holding them still loads with ``weights_only=True``)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    states = {'torch': torch.get_rng_state(), 'python': random.getstate(),
              'numpy': {'name': name, 'key': torch.from_numpy(key.astype(np.int64)), 'pos': int(pos),
                        'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states['torch'])
    random.setstate(_as_tuple(states['python']))
    n = states['numpy']
    np.random.set_state((n['name'], n['key'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    if 'cuda' in states and torch.cuda.is_available():
        cuda = states['cuda']
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            print_log(f'resume: the checkpoint has CUDA random states of {len(cuda)} devices, this process sees '
                      f'{torch.cuda.device_count()}; CUDA random states not restored', logger='current', level=30)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


class _RestoreAfter:
    """Wraps the train loop's data iterator: after ``count`` batches (MMEngine's replay up to the resumed
    iteration) it sets the random states, then steps aside."""

    def __init__(self, loop, count: int, states: Mapping[str, Any]):
        self.loop, self.inner, self.left, self.states = loop, loop.dataloader_iterator, count, states

    def __iter__(self):
        return self

    def __next__(self):
        if self.left == 0:
            set_random_states(self.states)
            self.loop.dataloader_iterator = self.inner
            return next(self.inner)
        self.left -= 1
        return next(self.inner)


@HOOKS.register_module(force=True)
class ExactResumeHook(Hook):
    """Saves the random states into checkpoints and restores them on resume (see the module docstring)."""

    priority = 'VERY_HIGH'

    def __init__(self):
        self._resumed_states = None
        self._outside_validation = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # Inside validation (a best checkpoint) the states to continue training from are the ones saved before it.
        checkpoint['random_states'] = self._outside_validation or random_states()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not getattr(runner, '_resume', False) or type(runner).__name__ == 'FlexibleRunner':
            return  # load_from is not a resume; FlexibleRunner strategies hold sharded or engine-owned states
        self._check_fits(runner, checkpoint)
        self._resumed_states = checkpoint.get('random_states')
        if self._resumed_states is None:
            print_log('resume: the checkpoint holds no random states (written by an older version); the run '
                      'continues with the seed\'s states, so it will not repeat an uninterrupted run exactly',
                      logger='current', level=30)

    def _check_fits(self, runner, checkpoint: dict) -> None:
        from mmengine.model import is_model_wrapper
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        saved = {k[len('module.'):] if k.startswith('module.') else k: v
                 for k, v in checkpoint.get('state_dict', {}).items()}
        problems = describe_mismatch(saved, model.state_dict())
        if problems:
            source = getattr(runner, '_load_from', None) or osp.join(runner.work_dir, 'last_checkpoint')
            raise RuntimeError(f'--resume: the checkpoint ({source}) was written by another model than this '
                               f'config builds: ' + '; '.join(problems) + '. Resume with the config the run was '
                               'started with, or start a new run (load_from= to initialise from it)')

    def before_train(self, runner) -> None:
        states, self._resumed_states = self._resumed_states, None
        if states is None:
            return
        loop = runner.train_loop
        if hasattr(loop, 'dataloader_iterator') and loop.iter > 0:  # IterBasedTrainLoop replays `iter` batches
            loop.dataloader_iterator = _RestoreAfter(loop, loop.iter, states)
        else:  # EpochBasedTrainLoop starts the next epoch with a fresh data iterator
            set_random_states(states)

    def before_val(self, runner) -> None:
        self._outside_validation = random_states()

    def after_val(self, runner) -> None:
        if self._outside_validation is not None:
            set_random_states(self._outside_validation)
            self._outside_validation = None


# ------------------------------------------------------------------------------------------------- teardown
def _shutdown_workers(iterator) -> None:
    inner = getattr(iterator, '_iterator', None)  # MMEngine's _InfiniteDataloaderIterator wraps torch's
    for it in (iterator, inner):
        if it is not None and hasattr(it, '_shutdown_workers'):
            it._shutdown_workers()


def finish_run(runner=None, synchronize: bool = True) -> None:
    """End a run explicitly: stop the data workers of its loaders, then (all ranks together) the process group.

    Left to interpreter exit, a gloo process group and worker processes are destroyed in arbitrary order, and
    under load a rank can abort with SIGABRT ("terminate called without an active exception") after its work is
    done. ``synchronize=False`` (after an error, when the other ranks may be anywhere) skips the final barrier.
    Safe to call without a runner, without distribution, and more than once.
    """
    import torch.distributed as torch_dist
    if runner is not None:
        for name in ('_train_loop', '_val_loop', '_test_loop'):
            loop = getattr(runner, name, None)
            if loop is None or isinstance(loop, dict):
                continue  # never built
            _shutdown_workers(getattr(loop, 'dataloader_iterator', None))
            loader = getattr(loop, 'dataloader', None)
            _shutdown_workers(loader)
            if loader is not None and getattr(loader, '_iterator', None) is not None:
                loader._iterator = None  # persistent workers: the loader keeps its iterator
    if torch_dist.is_available() and torch_dist.is_initialized():
        if synchronize:
            torch_dist.barrier()  # no rank leaves while another still talks to it
        torch_dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- config
def install_run_safety(cfg) -> None:
    """Use ``SafeCheckpointHook`` for the config's ``CheckpointHook`` and add ``ExactResumeHook`` (idempotent)."""
    checkpoint = (cfg.get('default_hooks') or {}).get('checkpoint')
    if isinstance(checkpoint, dict) and checkpoint.get('type') in ('CheckpointHook', 'mmengine.CheckpointHook'):
        checkpoint['type'] = 'SafeCheckpointHook'
    hooks = list(cfg.get('custom_hooks') or [])
    if not any(isinstance(h, dict) and h.get('type') == 'ExactResumeHook' for h in hooks):
        cfg.custom_hooks = hooks + [dict(type='ExactResumeHook')]


# Top-level keys that MMEngine's runners or this project read from a config, besides the Runner's arguments.
_READ_KEYS = {'runner_type', 'custom_imports', 'default_scope', 'model_wrapper_cfg', 'sync_bn', 'compile',
              'activation_checkpointing', 'efficient_conv_bn_eval', 'gpu_ids', 'strategy', 'launcher',
              'work_dir', 'resume', 'load_from', 'allow_partial_load'}


class ConfigOptionError(ValueError):
    """A ``--cfg-options`` key that would change nothing."""


def check_cfg_options(cfg, options: Mapping[str, Any]) -> None:
    """Refuse ``--cfg-options`` keys whose top level no runner reads (config variables used when the file was
    read: changing them afterwards changes nothing), naming where the same name is used instead."""
    from mmengine.runner import FlexibleRunner, Runner
    read = set(_READ_KEYS)
    for runner_cls in (Runner, FlexibleRunner):
        read |= set(inspect.signature(runner_cls.__init__).parameters)
    unread = []
    for key in options:
        top = key.split('.')[0]
        if top in read or top.endswith(('_dataloader', '_evaluator', '_cfg', '_hooks')):
            continue
        uses = sorted(_paths_ending_with(cfg.to_dict(), top.split('[')[0]))
        hint = f' (set {" / ".join(uses[:4])} instead)' if uses else ''
        unread.append(f'{key}={options[key]}: {top!r} is not read by the runner; a config variable is copied '
                      f'where it is used when the file is read, so setting it now changes nothing{hint}')
    if unread:
        raise ConfigOptionError('--cfg-options: ' + '; '.join(unread))


def _paths_ending_with(node: Any, name: str, prefix: str = '') -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            path = f'{prefix}.{key}' if prefix else str(key)
            if key == name and prefix:
                yield path
            yield from _paths_ending_with(value, name, path)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _paths_ending_with(value, name, f'{prefix}.{i}')
