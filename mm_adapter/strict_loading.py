"""Strict checkpoint loading for every MMEngine runner the tools build (``tools/test.py CKPT`` and ``load_from=``).

MMEngine loads ``load_from`` with ``strict=False``: a file that fits the model only partly loads what it can and
leaves the rest randomly initialised, with one warning. Here a checkpoint must fit: a tensor of the model that the
file lacks, a tensor of the file that the model lacks, or one of another shape stops the run with an error naming
a few of each, their count and the file. ``allow_partial_load=True`` (a top-level config key, or the
``allow_partial`` argument) loads the tensors that fit and logs the rest, for deliberate partial loads (another
head, fewer classes).

One mechanism for every runner (``install_strict_loading``):
  * ``Runner``: its ``load_checkpoint`` is replaced (the model is unwrapped first, so DDP is covered);
  * ``FlexibleRunner`` (DDP, FSDP, DeepSpeed strategies): the checkpoint is loaded into the bare model just
    before the strategy wraps it (after the strategy's weight initialisation), where every rank still holds the
    whole model, so FSDP shards and DeepSpeed ZeRO-3 partitions start from the loaded tensors; MMEngine's own
    ``load_from`` step is then skipped.
Resuming (``--resume``) is left to MMEngine, unchanged. A DeepSpeed checkpoint folder (``iter_N.pth/``) given as
``load_from`` is also left to the DeepSpeed strategy, which loads it with ``load_module_strict=True``.

Before comparing, the state dict goes through ``convert``: by default every converter a package registered with
``register_converter`` (segmentation: the published InternViT segmentor layout -> the project's names,
``segmentation.published_layout``; classification: the published InternVL probe head file -> the probe's heads),
so the adapter needs to know no package. Files are read with ``backbones.reading.safe_torch_load``
(``weights_only=True``; message-hub objects, and the foreign objects a converter declares, become inert stand-ins).
"""
from __future__ import annotations

import os.path as osp
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from torch import nn

from backbones.layouts import WeightsError
from backbones.loading import compare_state_dicts
from backbones.reading import safe_torch_load

StateDict = dict[str, torch.Tensor]
Converter = Callable[[StateDict, nn.Module], StateDict]

SHOWN = 5  # names shown per kind of problem; the rest is counted

_CONVERTERS: list[Converter] = []
_STAND_INS: set[str] = set()  # foreign globals that registered layouts' files pickle beside their tensors


def register_converter(convert: Converter, stand_ins: Iterable[str] = ()) -> Converter:
    """Add a layout converter applied (in registration order) to every file loaded strictly.

    ``convert(state_dict, model)`` gets the file's state dict and the (unwrapped) model it is loaded into, for
    layouts whose mapping depends on the target (a head file holds one head, with or without an EMA copy); it
    must return the state dict unchanged when the layout is not its own. ``stand_ins`` names the globals
    (``module.QualName``) such files pickle beside their tensors, e.g. a trainer's config class: reading replaces
    them by inert stand-ins instead of refusing the file."""
    if convert not in _CONVERTERS:
        _CONVERTERS.append(convert)
    _STAND_INS.update(stand_ins)
    return convert


def registered_converters(state_dict: StateDict, model: nn.Module) -> StateDict:
    for convert in _CONVERTERS:
        state_dict = convert(state_dict, model)
    return state_dict


def init_cfg_loads_pretrained(init_cfg: Any) -> bool:
    """Whether an MMEngine ``init_cfg`` (one dict or a list of them) loads a checkpoint (``type='Pretrained'``)."""
    cfgs = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    return any(isinstance(c, dict) and c.get('type') == 'Pretrained' for c in cfgs)


class CheckpointMismatchError(WeightsError):
    """A checkpoint that does not fit the model (missing, unexpected or mis-shaped tensors)."""


def read_checkpoint(filename: str) -> tuple[StateDict, dict]:
    """``(state_dict, checkpoint)`` of a file: an MMEngine/mmseg checkpoint (``{'meta', 'state_dict', ...}``) or a
    bare state dict. A leading ``module.`` on every key (a saved DDP/DeepSpeed module) is removed."""
    if osp.isfile(filename):
        checkpoint = safe_torch_load(filename, stand_ins=_STAND_INS)
    else:  # URLs and other schemes: MMEngine's loaders (weights_only, see mm_adapter.compat)
        from mmengine.runner.checkpoint import CheckpointLoader
        checkpoint = CheckpointLoader.load_checkpoint(filename, map_location='cpu')
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f'{filename} holds a {type(checkpoint).__name__}, not a checkpoint or state dict')
    state_dict = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state_dict, Mapping):
        raise WeightsError(f"{filename}: 'state_dict' holds a {type(state_dict).__name__}, not a state dict")
    if state_dict is checkpoint:
        checkpoint = {'state_dict': state_dict}
    state_dict = {k: v for k, v in state_dict.items() if isinstance(k, str)}
    if state_dict and all(k.startswith('module.') for k in state_dict):
        state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
    return state_dict, dict(checkpoint)


def fit_state_dict(model: nn.Module, state_dict: Mapping[str, Any], source: str,
                   allow_partial: bool = False) -> StateDict:
    """The tensors of ``state_dict`` that fit ``model``; raises ``CheckpointMismatchError`` unless all fit.

    Names and shapes are compared with ``model.state_dict()`` (parameters, buffers, extra state), whatever the
    dtypes (they are cast when copied). With ``allow_partial`` the misfits are logged instead, but a file of
    which nothing fits is still an error.
    """
    expected = model.state_dict()
    mismatch = compare_state_dicts(state_dict, expected)
    problems = mismatch.describe(SHOWN)
    fitting = {k: v for k, v in state_dict.items() if k in expected and k not in mismatch.misshaped}
    if not fitting:
        raise CheckpointMismatchError(f'{source} loads nothing into the model: ' + '; '.join(problems))
    if problems:
        message = f'{source} does not fit the model: ' + '; '.join(problems)
        if not allow_partial:
            raise CheckpointMismatchError(
                message + '. Use the config or checkpoint that belong together; to load only the tensors that fit '
                          '(a deliberate partial load), set allow_partial_load=True')
        print_log(f'{message}. allow_partial_load=True: loading the {len(fitting)} tensors that fit',
                  logger='current', level=30)
    return fitting


def _naming(source: str, err: Exception) -> Exception:
    """``err`` with ``source`` in front of its message (the same type; ``err`` itself where that type cannot be
    made from a message alone)."""
    try:
        return type(err)(f'{source}: {err}')
    except TypeError:
        return err


def _bare(model: nn.Module) -> nn.Module:
    from mmengine.model import BaseTTAModel
    if is_model_wrapper(model) or isinstance(model, BaseTTAModel):  # TTA (tools/test.py --tta) wraps the segmentor
        return model.module
    return model


def load_state_dict_strictly(model: nn.Module, state_dict: Mapping[str, Any], source: str,
                             allow_partial: bool = False) -> None:
    """Check ``state_dict`` against ``model`` (``fit_state_dict``), then copy it in; errors name ``source``."""
    model = _bare(model)
    fitting = fit_state_dict(model, state_dict, source, allow_partial)
    try:  # a model's own checks while loading (a probe's backbone record) are about this file too
        model.load_state_dict(fitting, strict=not allow_partial)
    except (ValueError, RuntimeError) as err:
        raise _naming(source, err) from None
    print_log(f'Loaded {len(fitting)} tensors from {source} (strict: {"no, partial" if allow_partial else "yes"})',
              logger='current')


def load_checkpoint_strictly(model: nn.Module, filename: str, allow_partial: bool = False,
                             convert: Optional[Converter] = None) -> dict:
    """Read ``filename``, convert its layout (``convert``), load it strictly; returns the checkpoint dict with
    the converted ``state_dict``."""
    state_dict, checkpoint = read_checkpoint(filename)
    source = filename
    if convert is not None:
        try:
            converted = convert(state_dict, _bare(model))
        except WeightsError as err:
            raise _naming(filename, err) from None
        if converted.keys() != state_dict.keys():
            source = f"{filename} (names below after mapping the file's layout to the model's)"
        state_dict = converted
    load_state_dict_strictly(model, state_dict, source, allow_partial)
    checkpoint['state_dict'] = state_dict
    return checkpoint


def install_strict_loading(runner, allow_partial: bool = False, convert: Optional[Converter] = None) -> None:
    """Make ``runner`` load ``load_from`` strictly (see the module docstring); resume is untouched."""
    from mmengine.runner import FlexibleRunner

    def load(model: nn.Module, filename: str) -> dict:
        checkpoint = load_checkpoint_strictly(model, filename, allow_partial, convert)
        runner.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        return checkpoint

    if isinstance(runner, FlexibleRunner):
        strategy = runner.strategy
        wrap_model = strategy._wrap_model

        def load_then_wrap(model: nn.Module):
            filename = runner._load_from
            if filename is not None and not runner._resume and not osp.isdir(filename):
                load(model, filename)
                runner._load_from = None  # loaded; MMEngine's load_or_resume would load it again, non-strictly
            return wrap_model(model)

        strategy._wrap_model = load_then_wrap
        return

    mmengine_load_checkpoint = runner.load_checkpoint

    def load_checkpoint(filename: str, map_location='cpu', strict: bool = False,
                        revise_keys=[(r'^module.', '')]) -> dict:  # noqa: B006 (MMEngine's signature)
        if runner._resume:
            # Runner.resume reads through load_checkpoint too: its own checkpoint, with the message hub and
            # optimizer state, unpickled by the work dir's trusted loader (mm_adapter.compat): unchanged.
            return mmengine_load_checkpoint(filename, map_location=map_location, strict=strict,
                                            revise_keys=revise_keys)
        return load(runner.model, filename)

    runner.load_checkpoint = load_checkpoint
