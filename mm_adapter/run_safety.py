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
- :class:`ExactResumeHook`: checkpoints also store the torch (CPU and CUDA), numpy and python random states of
  every process; on ``--resume`` each process's are restored after MMEngine has replayed the data loader up to the
  checkpoint's iteration (the sampler position, and the data workers' random streams with it), so a resumed run
  draws the same random numbers as an uninterrupted one. Validation runs with the training states saved and put
  back, so whether it ran between the checkpoint and the next iteration does not matter. On resume it also checks
  that the checkpoint's tensors fit the model of the config, naming the ones that differ (under FSDP from the
  shards' records of the original names and shapes, without gathering). The same under ``FlexibleRunner``
  (DDP, FSDP and DeepSpeed strategies).
- :func:`install_run_safety`: puts the two hooks into a config (``prepare_config`` calls it);
  :func:`install_exact_resume` makes every strategy's checkpoints hold every rank's states (``build_runner``).
- :func:`check_cfg_options`: refuses ``--cfg-options`` keys that nothing reads (a top-level config variable such
  as ``max_iters`` was already copied where it is used when the file was read; a new nested key that the type
  of its dict does not take, such as ``default_hooks.checkpoint.intervall``).
- :func:`finish_run`: stops data workers and the process group explicitly at the end of a run.
"""
from __future__ import annotations

import difflib
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


def checkpoint_hook_extra_arguments() -> set:
    """What ``CheckpointHook`` passes on from its ``**kwargs`` to ``runner.save_checkpoint`` (the arguments that
    method takes besides those the hook passes itself)."""
    passed = {'file_client_args', 'save_optimizer', 'save_param_scheduler', 'meta', 'by_epoch', 'backend_args'}
    return _save_checkpoint_parameters() - passed


@HOOKS.register_module(force=True)
class SafeCheckpointHook(CheckpointHook):
    """``CheckpointHook`` that deletes outdated checkpoints only after the new one and ``last_checkpoint`` are
    written, and checks its extra arguments when built (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        unknown = sorted(set(self.args) - checkpoint_hook_extra_arguments())
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

    def _save_best_checkpoint(self, runner, metrics):
        # MMEngine removes the previous best checkpoint before it writes the new one. Here it is shown no previous
        # best (so it removes none), and the previous ones are removed once every new best checkpoint and the
        # iteration checkpoint that names them are complete; a failed write leaves the previous best in place.
        previous = self._best_paths()
        if not previous:
            return super()._save_best_checkpoint(runner, metrics)
        self._set_best_paths(dict.fromkeys(previous))
        try:
            super()._save_best_checkpoint(runner, metrics)
        except BaseException:
            self._set_best_paths(previous)
            raise
        new = self._best_paths()
        self._set_best_paths({key: new[key] or previous[key] for key in previous})
        if not is_main_process():
            return
        for key, path in previous.items():
            if path and new[key] and new[key] != path:  # the same name: re-evaluated at the same iteration
                if self.file_backend.isfile(path):
                    self.file_backend.remove(path)
                elif self.file_backend.isdir(path):  # DeepSpeed checkpoints are directories
                    self.file_backend.rmtree(path)
                runner.logger.info(f'The previous best checkpoint {path} is removed ({new[key]} is complete)')

    def _best_paths(self) -> dict:
        if not self.save_best:
            return {}
        if hasattr(self, 'best_ckpt_path'):  # one metric
            return {None: self.best_ckpt_path}
        return dict(self.best_ckpt_path_dict)

    def _set_best_paths(self, paths: dict) -> None:
        if None in paths:
            self.best_ckpt_path = paths[None]
        else:
            self.best_ckpt_path_dict.update(paths)


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


def _per_rank(states: Mapping[str, Any]) -> list:
    """Every rank's ``states``, by rank (a collective when distributed: all ranks call it together)."""
    from mmengine.dist import all_gather_object, get_world_size
    return [states] if get_world_size() == 1 else all_gather_object(states)


def _expected_tensors(model) -> dict:
    """The names the model's state dict has, with their tensors or shapes, without gathering FSDP shards: a fully
    sharded unit's flat parameter records the original names and shapes; buffers are not sharded."""
    from mmengine.model import is_model_wrapper
    from torch.distributed.fsdp import FullyShardedDataParallel
    units = [(name, m) for name, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)]
    if not units:
        return (model.module if is_model_wrapper(model) else model).state_dict()
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    def join(*parts):
        return '.'.join(clean_tensor_name(p).strip('.') for p in parts if clean_tensor_name(p).strip('.'))
    expected = {}
    for name, unit in units:
        flat = unit._handle.flat_param if unit._handle is not None else None
        for fqn, shape in zip(getattr(flat, '_fqns', ()), getattr(flat, '_shapes', ())):
            expected[join(name, fqn)] = torch.Size(shape)
    for name, module in model.named_modules():
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer_name not in module._non_persistent_buffers_set:
                expected[join(name, buffer_name)] = buffer
    return expected


@HOOKS.register_module(force=True)
class ExactResumeHook(Hook):
    """Saves every rank's random states into checkpoints and restores them on resume (see the module docstring).
    Under several processes, ``install_exact_resume`` (``runtime.build_runner``) collects the ranks' states when a
    checkpoint is saved."""

    priority = 'VERY_HIGH'

    def __init__(self):
        self._resumed_states = None
        self._outside_validation = None
        self._collected = None
        self.meta_given = {}  # set by install_exact_resume's save_checkpoint

    def collect_states(self) -> None:
        """On every rank, before a checkpoint is saved: all ranks' states, for the rank that writes the file."""
        # Inside validation (a best checkpoint) the states to continue training from are the ones saved before it.
        self._collected = _per_rank(self._outside_validation or random_states())

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        states, self._collected = self._collected, None
        checkpoint['random_states'] = states or [self._outside_validation or random_states()]
        # FlexibleRunner.save_checkpoint overwrites the epoch/iteration its caller gives (Runner keeps them): a best
        # checkpoint written during validation after iteration N would say N + 1, and a resume skip an iteration.
        given, self.meta_given = self.meta_given, {}
        checkpoint.setdefault('meta', {}).update(given)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not getattr(runner, '_resume', False):
            return  # load_from is not a resume
        if 'state_dict' in checkpoint:  # (a DeepSpeed engine loads its own folder strictly)
            self._check_fits(runner, checkpoint)
        self._resumed_states = self._states_of_this_rank(checkpoint.get('random_states'))

    @staticmethod
    def _states_of_this_rank(saved) -> Optional[Mapping[str, Any]]:
        from mmengine.dist import get_rank, get_world_size
        if saved is None:
            print_log('resume: the checkpoint holds no random states (written by an older version); the run '
                      'continues with the seed\'s states, so it will not repeat an uninterrupted run exactly',
                      logger='current', level=30)
            return None
        if isinstance(saved, Mapping):  # written by a version that kept one process's states
            saved = [saved]
        if len(saved) != get_world_size():
            print_log(f'resume: the checkpoint holds the random states of {len(saved)} processes, this run has '
                      f'{get_world_size()}; each process continues with the first one\'s, so the run will not '
                      f'repeat an uninterrupted one exactly', logger='current', level=30)
            return saved[0]
        return saved[get_rank()]

    def _check_fits(self, runner, checkpoint: dict) -> None:
        saved = {k[len('module.'):] if k.startswith('module.') else k: v
                 for k, v in checkpoint['state_dict'].items()}
        expected = _expected_tensors(runner.model)
        if not any(k.endswith('_extra_state') for k in expected):  # (FSDP: not listed; not shape-checked anyway)
            saved = {k: v for k, v in saved.items() if not k.endswith('_extra_state')}
        problems = describe_mismatch(saved, expected)
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


def install_exact_resume(runner) -> None:
    """Make ``runner``'s checkpoints hold every rank's random states, under every strategy.

    ``runner.save_checkpoint`` is called by every rank (MMEngine's hooks do; FSDP and DeepSpeed gather weights
    collectively), while ``Runner`` writes, and calls ``before_save_checkpoint``, on rank 0 only: the ranks' states
    are collected just before, in the wrapper installed here. MMEngine's ``DeepSpeedStrategy`` calls no checkpoint
    hooks at all (its ``callback`` is "not supported yet"): its saving and resuming hand this hook the extra state
    that DeepSpeed stores beside its shards. A no-op without an ``ExactResumeHook``."""
    hook = next((h for h in runner.hooks if isinstance(h, ExactResumeHook)), None)
    if hook is None:
        return
    save_checkpoint = runner.save_checkpoint

    def save_with_states(*args, **kwargs):
        hook.collect_states()
        meta = kwargs.get('meta') if 'meta' in kwargs else (args[5] if len(args) > 5 else None)
        hook.meta_given = {k: meta[k] for k in ('epoch', 'iter') if k in meta} if isinstance(meta, dict) else {}
        return save_checkpoint(*args, **kwargs)

    runner.save_checkpoint = save_with_states
    strategy = getattr(runner, 'strategy', None)
    if not any(cls.__name__ == 'DeepSpeedStrategy' for cls in type(strategy).__mro__):  # subclasses too
        return  # (by name: importing MMEngine's DeepSpeedStrategy would import deepspeed)
    strategy_save, strategy_resume = strategy.save_checkpoint, strategy.resume

    def save_deepspeed(filename, *, extra_ckpt=None, **kwargs):
        extra_ckpt = {} if extra_ckpt is None else extra_ckpt
        hook.before_save_checkpoint(runner, extra_ckpt)
        return strategy_save(filename, extra_ckpt=extra_ckpt, **kwargs)

    def resume_deepspeed(filename, **kwargs):
        extra_ckpt = strategy_resume(filename, **kwargs)
        hook.after_load_checkpoint(runner, extra_ckpt)
        return extra_ckpt

    strategy.save_checkpoint, strategy.resume = save_deepspeed, resume_deepspeed


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
    """Refuse ``--cfg-options`` keys that nothing would read, before anything is built:

    - a top level that no runner reads (config variables used when the file was read: changing them afterwards
      changes nothing), naming where the same name is used instead;
    - a nested key that the config does not have yet, inside a dict with a ``type`` whose constructor does not take
      it (``model.backbone.nonexistent_key``, ``default_hooks.checkpoint.intervall``), naming what it takes. Keys
      the config already has are fine; a type that takes any ``**kwargs`` (and is not known to pass them on to
      something with a fixed signature: ``_KEYWORDS_PASSED_ON``) is not second-guessed.
    """
    import copy

    from mmengine.runner import FlexibleRunner, Runner
    read = set(_READ_KEYS)
    for runner_cls in (Runner, FlexibleRunner):
        read |= set(inspect.signature(runner_cls.__init__).parameters)
    merged = copy.deepcopy(cfg)
    merged.merge_from_dict(options)  # the types the options leave (one may set a type and its arguments)
    original, merged = cfg.to_dict(), merged.to_dict()
    unread = []
    for key in options:
        top = key.split('.')[0]
        if top in read or top.endswith(('_dataloader', '_evaluator', '_cfg', '_hooks')):
            problem = _unread_nested_key(original, merged, key.split('.'), cfg.get('default_scope'))
            if problem:
                unread.append(f'{key}={options[key]}: {problem}')
            continue
        uses = sorted(_paths_ending_with(original, top.split('[')[0]))
        hint = f' (set {" / ".join(uses[:4])} instead)' if uses else ''
        unread.append(f'{key}={options[key]}: {top!r} is not read by the runner; a config variable is copied '
                      f'where it is used when the file is read, so setting it now changes nothing{hint}')
    if unread:
        raise ConfigOptionError('--cfg-options: ' + '; '.join(unread))


def _child(node: Any, part: str) -> tuple:
    """(found, value) of ``node[part]`` for a dict key or a list index."""
    if isinstance(node, dict) and part in node:
        return True, node[part]
    if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
        return True, node[int(part)]
    return False, None


def _unread_nested_key(original: dict, merged: dict, parts: list, scope: Optional[str]) -> Optional[str]:
    """Why the option at ``parts`` would not be read, or None (it exists already, or nothing can tell)."""
    node, owner = original, merged
    for depth, part in enumerate(parts):
        found, node = _child(node, part)
        if not found:  # a new key of `owner` (the merged dict at parts[:depth])
            if depth == 0 or not isinstance(owner, dict) or 'type' not in owner:
                return None
            kind = owner['type']
            takes = _keywords_taken(kind, scope)
            if takes is None or part in takes:
                return None
            name = kind if isinstance(kind, str) else getattr(kind, '__name__', repr(kind))
            close = difflib.get_close_matches(part, takes, n=1)
            hint = f'did you mean {close[0]!r}? ' if close else ''
            return (f'{".".join(parts[:depth])} ({name}) takes no argument {part!r}; {hint}it takes '
                    f'{", ".join(sorted(takes - _BUILDER_KEYS))}')
        owner = _child(owner, part)[1]
    return None


# Keys the builders consume before calling a type (registry scope, epoch-to-iteration conversion of schedulers,
# the optimizer wrapper's constructor).
_BUILDER_KEYS = {'type', '_scope_', 'convert_to_iter_based', 'constructor', 'paramwise_cfg'}


def _internvit_shape_fields(obj) -> set:
    from backbones.presets import InternViTArch
    return set(InternViTArch.__dataclass_fields__)


def _next_in_mro(mixin: str):
    """For a mixin whose ``__init__(optimizer, *args, **kwargs)`` hands everything to the next class."""
    def keywords(obj) -> Optional[set]:
        names = [c.__name__ for c in obj.__mro__]
        following = [c for c in obj.__mro__[names.index(mixin) + 1:] if '__init__' in vars(c)]
        if not following:
            return None
        parameters = list(inspect.signature(following[0].__init__).parameters.values())[1:]
        if any(p.kind == p.VAR_KEYWORD for p in parameters):
            return None
        return {p.name for p in parameters if p.kind != p.VAR_POSITIONAL}
    return keywords


def _checkpoint_hook_keywords() -> set:
    """CheckpointHook's own arguments and what it passes on: a subclass taking ``(*args, **kwargs)``
    (SafeCheckpointHook) hands both to it."""
    own = inspect.signature(CheckpointHook).parameters.values()
    return {p.name for p in own if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} | checkpoint_hook_extra_arguments()


# Types whose ``**kwargs`` go to something with a fixed list of arguments: type name -> what those are.
_KEYWORDS_PASSED_ON = {'InternViT': _internvit_shape_fields,
                       'CheckpointHook': lambda obj: _checkpoint_hook_keywords(),
                       'LRSchedulerMixin': _next_in_mro('LRSchedulerMixin'),
                       'MomentumSchedulerMixin': _next_in_mro('MomentumSchedulerMixin')}


def _keywords_taken(kind: Any, scope: Optional[str]) -> Optional[set]:
    """The keyword arguments the type ``kind`` (a registered name or the object) takes; None where unknown."""
    candidates = _registered(kind, scope) if isinstance(kind, str) else [kind]
    taken: set = set()
    for obj in candidates:
        try:
            parameters = inspect.signature(obj).parameters.values()
        except (TypeError, ValueError):
            return None
        taken |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if any(p.kind == p.VAR_KEYWORD for p in parameters):
            passed_on = next((_KEYWORDS_PASSED_ON[cls.__name__] for cls in getattr(obj, '__mro__', ())
                              if cls.__name__ in _KEYWORDS_PASSED_ON), None)
            names = passed_on(obj) if passed_on else None
            if names is None:
                return None
            taken |= names
    return taken | _BUILDER_KEYS if candidates else None


def _registered(name: str, scope: Optional[str]) -> list:
    """Every object registered as ``name`` in MMEngine's registries and those of ``scope`` (e.g. mmseg)."""
    import importlib

    import mmengine.registry as root
    from mmengine.registry import DefaultScope, Registry
    modules = [root]
    if scope:
        try:
            modules.append(importlib.import_module(f'{scope}.registry'))
        except ImportError:
            pass
    registries = {id(r): r for m in modules for r in vars(m).values() if isinstance(r, Registry)}
    found = []
    with DefaultScope.overwrite_default_scope(scope):
        for registry in registries.values():
            try:
                obj = registry.get(name)
            except Exception:  # a registry that cannot import its modules here: it cannot answer
                obj = None
            if obj is not None and obj not in found:
                found.append(obj)
    return found


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
