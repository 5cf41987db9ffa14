"""Compatibility with the pinned OpenMMLab stack (mmcv-lite 2.1.0, MMEngine 0.10.7) on current PyTorch.

Two problems, two small fixes; nothing else belongs in this module.

1. ``mmcv.ops`` without compiled mmcv -- :func:`ensure_mmcv_ops`.
   Compiled mmcv does not build beside current torch on a machine without CUDA, so the project installs
   ``mmcv-lite``, whose ``mmcv.ops`` fails to import (``No module named 'mmcv._ext'``). mmsegmentation 1.2.2
   imports from ``mmcv.ops`` when ``mmseg.models`` is imported:

   - ``point_sample`` (``mmseg/models/utils/point_sample.py``, ``decode_heads/san_head.py``,
     ``utils/mask_classification.py``) -- provided here for real, as mmcv defines it (``F.grid_sample``);
   - ``sigmoid_focal_loss`` (``losses/focal_loss.py``; only called for CUDA tensors),
     ``CrissCrossAttention`` (``decode_heads/cc_head.py``), ``PSAMask`` (``decode_heads/psa_head.py``) --
     placeholders that import fine and raise :class:`MissingCompiledOpError` when *used*;
   - ``DeformConv2d``, ``ModulatedDeformConv2d`` (``engine/optimizers/force_default_constructor.py``; imported
     only when mmcv-full is detected) -- placeholders as well.

   Any other public name looked up on the stand-in raises ``ModuleNotFoundError`` with a clear message, the same
   exception type mmcv-lite itself raises, which is what mmcv/mmseg code that tolerates a missing compiled mmcv
   catches. When ``mmcv._ext`` is importable (a compiled mmcv is installed), nothing is changed.

2. ``torch.load(weights_only=True)`` versus MMEngine resume -- :func:`trust_checkpoints_in`.
   Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``; MMEngine 0.10.7 checkpoints hold
   ``HistoryBuffer`` and numpy objects (the message hub) and therefore do not load, so ``--resume`` fails. The
   statistics methods of ``HistoryBuffer`` are pickled through ``builtins.getattr``; allow-listing that would
   allow arbitrary code execution, so this module never adds safe globals. Instead it draws a trust boundary:
   a file whose real path lies inside the run's own work dir (a checkpoint this run wrote) is unpickled in full,
   every other file (``load_from``, pretrained weights, downloads) loads with ``weights_only=True`` (for another
   run's MMEngine checkpoint, its message-hub objects become inert stand-ins: see
   ``backbones.reading.safe_torch_load``) and is refused with :class:`UntrustedCheckpointError` otherwise.
   Pretrained weights belong in safetensors or plain state dicts of tensors, which load under ``weights_only=True``.
"""
from __future__ import annotations

import importlib
import os
import pickle
import sys
import types
import warnings
from typing import Any, Callable, Optional, Union

__all__ = ['ensure_mmcv_ops', 'MissingCompiledOpError', 'trust_checkpoints_in', 'UntrustedCheckpointError',
           'CorruptCheckpointError']

# --------------------------------------------------------------------------------------------------------------
# 1. mmcv.ops stand-in
# --------------------------------------------------------------------------------------------------------------

_SHIM_FLAG = '__mmcv_ops_shim__'


class MissingCompiledOpError(RuntimeError):
    """Raised when a placeholder op of the pure-PyTorch ``mmcv.ops`` stand-in is used."""


def _missing_message(name: str) -> str:
    return (f'mmcv.ops.{name} needs a compiled mmcv (the mmcv._ext extension), which is not installed '
            f'(mmcv-lite has no compiled ops). mm_adapter.compat only provides a pure-PyTorch point_sample. '
            f"Install a compiled mmcv (mmcv>=2.0.0rc4,<2.2.0 built for your torch/CUDA) to use {name}.")


def _placeholder_function(name: str) -> Callable[..., Any]:
    def op(*args: Any, **kwargs: Any) -> Any:
        raise MissingCompiledOpError(_missing_message(name))

    op.__name__ = op.__qualname__ = name
    op.__doc__ = f'Placeholder for mmcv.ops.{name}: raises MissingCompiledOpError when called.'
    return op


def _placeholder_class(name: str) -> type:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        raise MissingCompiledOpError(_missing_message(name))

    return type(name, (), {'__init__': __init__, '__module__': 'mmcv.ops',
                           '__doc__': f'Placeholder for mmcv.ops.{name}: raises MissingCompiledOpError when built.'})


def point_sample(input, points, align_corners: bool = False, **kwargs):  # noqa: A002 - mmcv's signature
    """Pure-PyTorch ``mmcv.ops.point_sample`` (identical to mmcv 2.1.0's definition).

    Samples ``input`` (N, C, H, W) at ``points`` given in [0, 1] x [0, 1] coordinates, shape (N, P, 2) or
    (N, Hg, Wg, 2), with ``F.grid_sample`` after mapping the points to [-1, 1]. Returns (N, C, P) or
    (N, C, Hg, Wg). Extra keyword arguments go to ``F.grid_sample``.
    """
    import torch.nn.functional as F

    add_dim = False
    if points.dim() == 3:
        add_dim = True
        points = points.unsqueeze(2)
    output = F.grid_sample(input, points * 2.0 - 1.0, align_corners=align_corners, **kwargs)
    if add_dim:
        output = output.squeeze(3)
    return output


def _module_getattr(name: str) -> Any:
    if name.startswith('_'):  # dunder/private look-ups (inspect, pickle, pytest) must see a normal module
        raise AttributeError(f"module 'mmcv.ops' has no attribute {name!r}")
    raise ModuleNotFoundError(_missing_message(name), name='mmcv._ext')


def _build_shim() -> types.ModuleType:
    from importlib.machinery import ModuleSpec

    shim = types.ModuleType('mmcv.ops', 'Pure-PyTorch stand-in for mmcv.ops (installed by mm_adapter.compat).')
    shim.__spec__ = ModuleSpec('mmcv.ops', loader=None, origin=__file__)
    shim.__file__ = __file__
    setattr(shim, _SHIM_FLAG, True)
    shim.point_sample = point_sample
    shim.sigmoid_focal_loss = _placeholder_function('sigmoid_focal_loss')
    for name in ('CrissCrossAttention', 'PSAMask', 'DeformConv2d', 'ModulatedDeformConv2d',
                 'MultiScaleDeformableAttention'):
        setattr(shim, name, _placeholder_class(name))
    shim.__getattr__ = _module_getattr  # PEP 562: any other name -> ModuleNotFoundError with a clear message
    shim.__all__ = ['point_sample', 'sigmoid_focal_loss', 'CrissCrossAttention', 'PSAMask', 'DeformConv2d',
                    'ModulatedDeformConv2d', 'MultiScaleDeformableAttention']
    return shim


def ensure_mmcv_ops() -> bool:
    """Make ``mmcv.ops`` importable; call before ``mmseg`` is imported (``mm_adapter/__init__.py`` does).

    If mmcv's compiled extension ``mmcv._ext`` imports, nothing is changed and ``False`` is returned. Otherwise a
    pure-PyTorch stand-in is put in ``sys.modules['mmcv.ops']`` (see the module docstring for what it holds) and
    ``True`` is returned. Idempotent: later calls return the same answer and change nothing. If mmcv itself is not
    installed, nothing is done and ``False`` is returned (mmseg will then report the missing mmcv itself).
    """
    existing = sys.modules.get('mmcv.ops')
    if existing is not None:
        return bool(getattr(existing, _SHIM_FLAG, False))
    try:
        import mmcv
    except ImportError:
        return False
    try:
        importlib.import_module('mmcv._ext')
        return False  # compiled mmcv: the real mmcv.ops is used
    except ModuleNotFoundError:
        pass
    except ImportError as err:  # present but unloadable (e.g. built for another torch): real mmcv.ops cannot work
        warnings.warn(f'mmcv._ext is installed but does not load ({err}); using the pure-PyTorch mmcv.ops '
                      'stand-in from mm_adapter.compat instead.', RuntimeWarning, stacklevel=2)
    shim = _build_shim()
    sys.modules['mmcv.ops'] = shim
    # mmcv.cnn imports this submodule and warns "install mmcv rather than mmcv-lite" when it is missing; the
    # placeholder (an error only if used) keeps that import quiet, as for the other compiled ops.
    deform = types.ModuleType('mmcv.ops.multi_scale_deform_attn', 'Placeholder (installed by mm_adapter.compat).')
    deform.MultiScaleDeformableAttention = shim.MultiScaleDeformableAttention
    sys.modules[deform.__name__] = deform
    mmcv.ops = shim
    return True


# --------------------------------------------------------------------------------------------------------------
# 2. Checkpoint trust boundary for MMEngine's CheckpointLoader
# --------------------------------------------------------------------------------------------------------------

PathLike = Union[str, 'os.PathLike[str]']


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A file outside the trusted work dir needed full unpickling (it does not load with weights_only=True)."""


def _refusal(source: str, trusted_dir: Optional[str], err: Exception) -> UntrustedCheckpointError:
    where = f'outside the trusted work dir {trusted_dir}' if trusted_dir else 'no work dir is trusted'
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if 'global' in line.lower()), lines[-1] if lines else repr(err))
    return UntrustedCheckpointError(
        f'Refused to unpickle {source}: it is not a checkpoint this run wrote ({where}), and it does not load '
        f'with torch.load(weights_only=True) ({detail}). Pretrained weights should be safetensors or a plain '
        f'state dict of tensors.')


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a PyTorch file); the message names it."""


def _unreadable(filename: str, err: Exception) -> CorruptCheckpointError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ''
    return CorruptCheckpointError(f'cannot read checkpoint {filename}: the file is corrupt or truncated, or not a '
                                  f'PyTorch checkpoint ({type(err).__name__}: {first})')


def _is_inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def _to_location(checkpoint: Any, map_location: Any) -> Any:
    import torch
    if map_location is None or map_location == 'cpu':
        return checkpoint
    if isinstance(checkpoint, torch.Tensor):
        return checkpoint.to(map_location if not callable(map_location) else 'cpu')
    if isinstance(checkpoint, dict):
        return {k: _to_location(v, map_location) for k, v in checkpoint.items()}
    return checkpoint


def trust_checkpoints_in(work_dir: Optional[PathLike]) -> Optional[str]:
    """Install MMEngine checkpoint loaders that unpickle fully only files inside ``work_dir``.

    Overrides (``force=True``) MMEngine's ``CheckpointLoader`` schemes for local files (prefix ``''``) and for
    ``http://`` / ``https://``:

    - a local file whose real path (symlinks and ``..`` resolved) lies inside the real path of ``work_dir`` is
      loaded with ``torch.load(weights_only=False)`` -- this is how ``Runner.resume`` reads its own checkpoints;
    - every other file, and every download, is loaded with ``weights_only=True``; a local MMEngine checkpoint of
      another run loads with its message-hub objects replaced by inert stand-ins (so ``load_from`` and
      ``tools/test.py`` accept any run's checkpoint); anything else non-tensor raises
      :class:`UntrustedCheckpointError`, which names the file and says why it was refused.

    Call it once per run, before ``runner.train()`` / ``runner.test()``, with the directory the CheckpointHook
    writes to (``cfg.work_dir`` unless ``out_dir`` is set). A later call replaces the trusted dir;
    ``work_dir=None`` trusts no directory. The work dir must be writable only by you: anything placed in it is
    trusted. No globals are ever allow-listed. Schemes that mmengine resolves to URLs internally
    (``torchvision://``, ``open-mmlab://``, ``mmcls://``) are not changed. Returns the resolved trusted dir.
    """
    import torch
    from mmengine.runner.checkpoint import CheckpointLoader

    trusted = None if work_dir is None else os.path.realpath(os.path.expanduser(os.fspath(work_dir)))

    def load_from_local(filename: str, map_location: Any = None) -> Any:
        filename = os.path.expanduser(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        if trusted is not None and _is_inside(os.path.realpath(filename), trusted):
            try:
                return torch.load(filename, map_location=map_location, weights_only=False)
            except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
                raise _unreadable(filename, err) from err
        try:
            return torch.load(filename, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            # Another run's MMEngine checkpoint (load_from, tools/test.py): its tensors and plain metadata load,
            # its message-hub objects become inert stand-ins; anything else stays refused.
            from backbones.layouts import WeightsError
            from backbones.reading import safe_torch_load
            try:
                checkpoint = safe_torch_load(filename)
            except WeightsError as refused:
                if str(refused).startswith('cannot read'):  # corrupt or truncated, not a refused object
                    raise CorruptCheckpointError(str(refused)) from err
                raise _refusal(filename, trusted, err) from err
            return _to_location(checkpoint, map_location)
        except (RuntimeError, EOFError, ValueError) as err:  # e.g. PytorchStreamReader on a truncated zip
            raise _unreadable(filename, err) from err

    def load_from_http(filename: str, map_location: Any = None, model_dir: Optional[str] = None) -> Any:
        from torch.hub import load_state_dict_from_url
        try:
            return load_state_dict_from_url(filename, model_dir=model_dir, map_location=map_location,
                                            progress=False, weights_only=True)
        except pickle.UnpicklingError as err:
            raise _refusal(filename, trusted, err) from err

    # mmengine logs the loader's name minus its first 10 characters ('load_from_'), so keep these names.
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)
    CheckpointLoader.register_scheme(prefixes=('http://', 'https://'), loader=load_from_http, force=True)
    return trusted
