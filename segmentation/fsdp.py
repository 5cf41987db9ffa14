"""FSDP for full tuning of InternViT-6B: one shard unit per transformer block, blocks in bf16, the rest in fp32.

Used through MMEngine's ``FlexibleRunner`` + ``FSDPStrategy``::

    strategy = dict(type='FSDPStrategy',
                    model_wrapper=dict(type='InternViTBlockFSDP', block_param_dtype='bfloat16'))

Every ``backbones.internvit.Block`` becomes its own FSDP unit with bf16 compute (fp32 master weights, fp32 gradient
reduction); embeddings, neck and heads stay in the fp32 root unit, where ``AmpOptimWrapper`` autocasts them.
Activation checkpointing is switched on by the backbone's ``grad_checkpointing=True``; under FSDP it must run
*inside* each unit (recomputing around an FSDP unit loses its input cast and parameter gathering), so the wrapper
moves it there: each block becomes ``FSDP(CheckpointWrapper(Block))`` and the backbone's own checkpointing is off.
``use_orig_params=True`` keeps the parameter names the layer-decay constructor reads. Without a GPU the wrapper
runs on the CPU (gloo), which is what the tests use.

Start-up in bounded host memory: ``strategy = dict(type='InternViTFSDPStrategy', ...)`` builds the model with the
InternViT backbone on the meta device (``segmentation.sharded_startup``, ``backbones.deferred_load``). FSDP allocates
each unit's tensors without writing them (``param_init_fn``), makes the unit's flat parameter without values (FSDP1
would otherwise concatenate the whole unit, writing it all) and keeps this rank's shard; then each rank writes only
the elements of its shard, read from the memory-mapped ``pretrained`` checkpoint or from the replayed random
initialisation. A rank so holds its shards plus one parameter's read, never a whole unit. Neck and heads are built
and initialised as before (rank 0's broadcast), so the weights are those of an ordinary start-up. It also resumes
(``--resume``), which MMEngine 0.10.7's ``FSDPStrategy`` cannot with current torch (see ``load_optim_state_dict``).
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Optional

import torch
import torch.distributed.fsdp._optim_utils as fsdp_optim_utils
from mmengine._strategy import FSDPStrategy
from mmengine.logging import print_log
from mmengine.model.wrappers import MMFullyShardedDataParallel
from mmengine.registry import STRATEGIES
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import BackwardPrefetch, FullyShardedDataParallel, MixedPrecision, ShardingStrategy
from torch.distributed.fsdp._flat_param import FlatParameter, FlatParamHandle
from torch.distributed.fsdp.wrap import CustomPolicy

from backbones.deferred_load import allocate, fill, pending_value, range_reader
from backbones.dtypes import as_dtype
from backbones.internvit import Block, InternViT

from ._registry import register_everywhere
from .sharded_startup import DeferredBackboneStrategy


def block_wrap_policy(block_param_dtype=torch.bfloat16) -> CustomPolicy:
    """Wrap every InternViT ``Block`` as its own FSDP unit, with mixed precision for the blocks only."""
    overrides = {}
    if block_param_dtype is not None and block_param_dtype != torch.float32:
        overrides['mixed_precision'] = MixedPrecision(param_dtype=block_param_dtype, reduce_dtype=torch.float32,
                                                      buffer_dtype=torch.float32, cast_forward_inputs=True)
    return CustomPolicy(lambda module: (overrides or True) if isinstance(module, Block) else False)


@contextlib.contextmanager
def _flat_parameters_without_values():
    """While FSDP wraps a deferred model: a unit whose tensors are all pending (``backbones.deferred_load.allocate``)
    gets its flat parameter without values (FSDP1 would concatenate the whole unit into a new tensor, writing all of
    it, before keeping this rank's shard); ``_write_deferred_shards`` writes the shard afterwards. A unit that mixes
    pending and ordinary tensors (the root: embeddings with neck and heads) gets its pending values first."""
    original = FlatParamHandle.flatten_tensors_into_flat_param

    def flatten_tensors_into_flat_param(handle, tensors, aligned_numel, requires_grad):
        pending = [pending_value(t) is not None for t in tensors]
        if all(pending):
            layout = handle.flatten_tensors([torch.empty_like(t, device='meta') for t in tensors], aligned_numel)
            flat = FlatParameter(torch.empty(layout.shape, dtype=layout.dtype, device=tensors[0].device),
                                 requires_grad=requires_grad)
            flat._deferred_readers = [range_reader(t) for t in tensors]  # in the order of its parameter infos
            return flat
        for tensor, is_pending in zip(tensors, pending):
            if is_pending:
                fill(tensor)
        return original(handle, tensors, aligned_numel, requires_grad)

    FlatParamHandle.flatten_tensors_into_flat_param = flatten_tensors_into_flat_param
    try:
        yield
    finally:
        FlatParamHandle.flatten_tensors_into_flat_param = original


@torch.no_grad()
def _write_deferred_shards(root: FullyShardedDataParallel) -> None:
    """Write each rank's shard of every flat parameter made without values: for each original parameter, the elements
    of its flattened value that lie in this rank's shard (padding: zeros)."""
    for unit in FullyShardedDataParallel.fsdp_modules(root):
        flat = unit._handle.flat_param if unit._handle is not None else None
        readers = getattr(flat, '_deferred_readers', None)
        if readers is None:
            continue
        flat.zero_()
        for read, info in zip(readers, flat._shard_param_infos, strict=True):
            if info.in_shard:
                flat[info.offset_in_shard:info.offset_in_shard + info.numel_in_shard].copy_(
                    read(info.intra_param_start_idx, info.intra_param_end_idx + 1))
        del flat._deferred_readers


@register_everywhere('MODEL_WRAPPERS')
class InternViTBlockFSDP(MMFullyShardedDataParallel):
    """``MMFullyShardedDataParallel`` with the InternViT block wrap policy (see the module docstring).

    Args:
        module: the segmentor.
        block_param_dtype: compute dtype of the blocks (``'bfloat16'``/``'bf16'``, ``'float16'``/``'fp16'``;
            ``None``/``'float32'`` for fp32), parsed by ``backbones.dtypes.as_dtype``.
        device_id: the GPU of this rank (MMEngine passes ``LOCAL_RANK``); without CUDA the CPU is used.
        sharding_strategy, backward_prefetch: FSDP's, by name (``'FULL_SHARD'``, ``'BACKWARD_PRE'``).
        **kwargs: other ``FullyShardedDataParallel`` arguments (``limit_all_gathers``, ``sync_module_states``...).
    """

    def __init__(self, module: nn.Module, block_param_dtype: Optional[str] = 'bfloat16', device_id=None,
                 sharding_strategy: str = 'FULL_SHARD', backward_prefetch: Optional[str] = 'BACKWARD_PRE',
                 use_orig_params: bool = True, **kwargs):
        if 'auto_wrap_policy' in kwargs or 'mixed_precision' in kwargs:
            raise ValueError('InternViTBlockFSDP sets auto_wrap_policy and mixed_precision itself; '
                             'use block_param_dtype, or MMFullyShardedDataParallel for a custom policy')
        if not use_orig_params:
            raise ValueError('InternViTBlockFSDP needs use_orig_params=True (layer-wise lr decay reads the '
                             'original parameter names)')
        if not torch.cuda.is_available():
            device_id = torch.device('cpu')
        deferred = any(p.is_meta for p in module.parameters())  # built by InternViTFSDPStrategy
        if deferred:
            device = device_id if isinstance(device_id, torch.device) else torch.device('cuda', device_id or 0)
            kwargs.setdefault('param_init_fn', partial(allocate, device=device))
        # MMFullyShardedDataParallel.__init__ only converts config strings and refuses policy objects, so the
        # FSDP constructor is called directly with converted arguments.
        with _flat_parameters_without_values() if deferred else contextlib.nullcontext():
            FullyShardedDataParallel.__init__(
                self, module=module,
                sharding_strategy=ShardingStrategy[sharding_strategy],
                backward_prefetch=BackwardPrefetch[backward_prefetch] if backward_prefetch else None,
                auto_wrap_policy=block_wrap_policy(as_dtype(block_param_dtype)),
                device_id=device_id, use_orig_params=True, **kwargs)
        if deferred:
            _write_deferred_shards(self)
        self._checkpoint_inside_units()

    def _checkpoint_inside_units(self) -> None:
        backbones = [m for m in self.modules() if isinstance(m, InternViT) and m.grad_checkpointing]
        if not backbones:
            return
        for backbone in backbones:
            backbone.grad_checkpointing = False  # done by the wrappers below instead
        apply_activation_checkpointing(
            self, checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda module: isinstance(module, Block))
        print_log('InternViTBlockFSDP: activation checkpointing inside every block unit', logger='current')


@contextlib.contextmanager
def _gathered_optimizer_states_copied():
    """torch 2.14, CPU only: FSDP's full optimizer state dict gathers each state (exp_avg, then exp_avg_sq) into one
    reused buffer and keeps views of it; on a GPU the offload to the CPU copies them, on the CPU nothing does, so every
    saved state would hold the last one gathered (Adam's first moments = its second moments) and a resumed run would
    continue from wrong moments. Copy CPU states before they are unflattened, as the GPU path does."""
    unflatten = getattr(fsdp_optim_utils, '_unflatten_orig_param_states', None)
    if unflatten is None:  # another torch: its own code path, nothing to mend here
        yield
        return

    def unflatten_copies(fsdp_param_info, output_states, state_name, *args, **kwargs):
        for states in output_states.values():
            value = states.get(state_name)
            if isinstance(value, torch.Tensor) and value.device.type == 'cpu':
                states[state_name] = value.clone()
        return unflatten(fsdp_param_info, output_states, state_name, *args, **kwargs)

    fsdp_optim_utils._unflatten_orig_param_states = unflatten_copies
    try:
        yield
    finally:
        fsdp_optim_utils._unflatten_orig_param_states = unflatten


@STRATEGIES.register_module(force=True)
class InternViTFSDPStrategy(DeferredBackboneStrategy, FSDPStrategy):
    """``FSDPStrategy`` whose InternViT backbones start on the meta device, each rank writing only its shards while
    ``InternViTBlockFSDP`` wraps them (see the module docstring and ``segmentation.sharded_startup``). Same arguments
    as ``FSDPStrategy``; the model wrapper must be ``InternViTBlockFSDP``."""

    def optim_state_dict(self) -> dict:
        with _gathered_optimizer_states_copied():
            state = super().optim_state_dict()
        if getattr(self.optim_wrapper, 'base_param_settings', None) is not None:  # the wrapper's own; FSDP drops it
            state['base_param_settings'] = self.optim_wrapper.base_param_settings
        return state

    def load_optim_state_dict(self, state_dict: dict) -> None:
        # --resume: MMEngine 0.10.7 passes FSDP.optim_state_dict_to_load the arguments of torch < 2.0, in another
        # order, and fails (TypeError: unhashable type: 'dict').
        base_param_settings = state_dict.pop('base_param_settings', None)
        self.optim_wrapper.load_state_dict(FullyShardedDataParallel.optim_state_dict_to_load(
            self.model, self.optim_wrapper.optimizer, state_dict))
        if base_param_settings is not None:
            self.optim_wrapper.base_param_settings = base_param_settings
