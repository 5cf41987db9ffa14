"""Start-up in bounded host memory for full tuning: the InternViT backbone on the meta device, each rank writing
only the part it holds (``backbones.deferred_load``), under FSDP or DeepSpeed ZeRO-3.

    strategy = dict(type='InternViTFSDPStrategy', model_wrapper=dict(type='InternViTBlockFSDP', ...))  # fsdp.py
    strategy = dict(type='InternViTDeepSpeedStrategy', zero_optimization=dict(stage=3, ...), ...)      # here

Both build the model under ``deferred_loading()``: the backbone stays on the meta device, its ``pretrained``
checkpoint checked but not read, or (without ``pretrained``) its random initialisation drawn as an eager build
draws it. Neck and heads are built, initialised and broadcast as before, so the final weights are those of
MMEngine's ``FSDPStrategy`` / ``DeepSpeedStrategy`` with the same seed.

DeepSpeed: ``deepspeed.zero.Init`` partitions each parameter as a module is constructed, which needs the model to be
built inside its context (its tensor constructors override a meta device). Here the finished meta model is converted
the same way instead, with a ``zero.Init`` object's own converter, one parameter at a time in the model's order (the
order ``deepspeed.initialize`` would convert them in): a backbone parameter is allocated without being written,
partitioned, and its partition filled from the checkpoint (or the replayed random initialisation); any other
parameter is moved, cast and broadcast from rank 0 as ``deepspeed.initialize`` does for a model it partitions itself.
"""
from __future__ import annotations

from mmengine._strategy import DeepSpeedStrategy
from mmengine.logging import print_log
from mmengine.registry import STRATEGIES
from torch import nn

from backbones.deferred_load import allocate, deferred_loading, pending_value, range_reader, written
from backbones.internvit import InternViT
from mm_adapter.strict_loading import init_cfg_loads_pretrained


class DeferredBackboneStrategy:
    """Mixin for an MMEngine strategy: InternViT backbones built on the meta device (see the module docstring)."""

    def build_model(self, model):
        with deferred_loading():
            model = super().build_model(model)
        deferred = sum(p.numel() for p in model.parameters() if p.is_meta)
        if deferred:
            print_log(f'{type(self).__name__}: {deferred:,} backbone parameters on the meta device, each rank '
                      f'writes its shard while wrapping', logger='current')
        return model

    def _init_model_weights(self, model: nn.Module) -> nn.Module:
        # MMEngine's version calls init_weights and broadcasts every tensor from rank 0; the deferred backbones have
        # no values yet (each rank writes its own shard while wrapping), so they are set aside meanwhile. InternViT's
        # own init_weights does nothing (weights are set at construction).
        deferred = [name for name, m in model.named_modules()
                    if isinstance(m, InternViT) and any(p.is_meta for p in m.parameters())]
        if '' in deferred:
            return model  # the model is the backbone itself: nothing else to initialise
        for name in deferred:
            _refuse_init_cfg_over(model, name)
        parents = [model.get_submodule(name.rpartition('.')[0]) for name in deferred]
        children = [name.rpartition('.')[2] for name in deferred]
        backbones = [parent._modules[child] for parent, child in zip(parents, children)]
        for parent, child in zip(parents, children):
            parent._modules[child] = nn.Module()
        try:
            return super()._init_model_weights(model)
        finally:
            for parent, child, backbone in zip(parents, children, backbones):
                parent._modules[child] = backbone


def _refuse_init_cfg_over(model: nn.Module, backbone: str) -> None:
    """A ``Pretrained`` ``init_cfg`` of a module above the backbone would load the backbone's tensors too; with the
    backbone set aside (meta device) they would be skipped without a word, so it is refused."""
    parts = backbone.split('.')
    for depth in range(len(parts)):
        name = '.'.join(parts[:depth])
        init_cfg = getattr(model.get_submodule(name), 'init_cfg', None)
        if init_cfg_loads_pretrained(init_cfg):
            raise ValueError(f'{name or "the model"} has init_cfg={init_cfg}, which would load the backbone '
                             f'({backbone}) too; the sharded start-up builds the backbone on the meta device and '
                             f'does not run it. Give the backbone its weights with {backbone}.pretrained=PATH (and '
                             f'the rest with load_from), or use MMEngine\'s FSDPStrategy / DeepSpeedStrategy')


@STRATEGIES.register_module(force=True)
class InternViTDeepSpeedStrategy(DeferredBackboneStrategy, DeepSpeedStrategy):
    """``DeepSpeedStrategy`` (ZeRO-3) whose InternViT backbones start on the meta device and are partitioned and
    filled per parameter (see the module docstring). Same arguments as ``DeepSpeedStrategy``."""

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        # Here, not earlier: load_from is loaded into the bare model just before wrapping (mm_adapter.strict_loading),
        # and a load into the deferred backbone only redirects where its partitions are read from.
        if any(p.is_meta for p in model.parameters()):
            stage = self.config.get('zero_optimization', {}).get('stage', 0)
            if stage != 3:
                raise ValueError(f'InternViTDeepSpeedStrategy partitions the backbone as ZeRO-3 does; the config has '
                                 f'zero_optimization.stage={stage}: use stage 3, or DeepSpeedStrategy')
            replaced = partition_for_zero3(model, self.config)
            if hasattr(self, 'optim_wrapper'):  # built over the meta parameters, which are replaced now
                for group in self.optim_wrapper.optimizer.param_groups:
                    group['params'] = [replaced.get(id(p), p) for p in group['params']]
        return super()._wrap_model(model)


def partition_for_zero3(model: nn.Module, config: dict) -> dict[int, nn.Parameter]:
    """Make every parameter of ``model`` a ZeRO-3 parameter, as ``deepspeed.initialize`` would (see the module
    docstring); deferred ones are written partition by partition, never whole. Returns id(meta parameter) -> the
    parameter that replaced it."""
    import deepspeed
    import torch
    init = deepspeed.zero.Init(config_dict_or_path=config)  # not entered: its converter is used directly
    if init.zero_param_process_group is not None:
        raise ValueError('InternViTDeepSpeedStrategy does not support hierarchical partitioning '
                         '(zero_optimization.zero_hpz_partition_size > 1); use DeepSpeedStrategy')
    # A model with ZeRO-3 parameters counts as built under zero.Init: DeepSpeed then neither casts it to the
    # fp16/bf16 of the config nor moves it to the device, so both are done here (parameters only are cast, as there).
    half = init.dtype if init.dtype in (torch.float16, torch.bfloat16) else None
    replaced = {}
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(init.local_device)
        for param in module.parameters(recurse=False):
            if half is not None and param.is_floating_point():
                param.data = param.data.to(half)  # meta ones stay meta
        before = dict(module.named_parameters(recurse=False))
        allocate(module, init.local_device)  # the deferred ones: allocated (new parameters), not written
        replaced.update({id(before[name]): param for name, param in module.named_parameters(recurse=False)
                         if param is not before[name]})
        for param in module.parameters(recurse=False):
            if pending_value(param) is None:
                param.data = param.data.to(init.local_device)
                init._convert_to_zero_parameters([param])  # broadcast from rank 0, then partitioned
                continue
            read = range_reader(param)
            init._convert_to_deepspeed_param(param)
            param.partition()  # keeps this rank's partition of the unwritten tensor, frees the tensor
            part = param.ds_tensor
            start = part.numel() * init._partition_rank(param)
            count = max(0, min(part.numel(), param.ds_numel - start))
            with torch.no_grad():
                part.zero_()  # the padding after the last element
                if count:
                    part[:count].copy_(read(start, start + count))
            written(param)
    return replaced
