"""The OpenMMLab adapter of the torch-only ``backbones``: everything MMEngine/mmseg needs to see InternViT.

Configs name it first in ``custom_imports`` (``imports=['mm_adapter', 'segmentation']``); the tools import it.
Importing it:

- puts the pure-PyTorch ``mmcv.ops`` stand-in in place when mmcv has no compiled ops (``compat``), before anything
  imports mmseg;
- registers ``InternViT`` in MMEngine's root ``MODELS`` registry (mmseg's registry finds it there through its
  parent, so ``type='InternViT'`` works with and without ``default_scope='mmseg'``);
- sends the log lines of ``backbones`` and ``chat`` (standard ``logging``) to MMEngine's current logger, so they
  appear in a run's log.

``runtime`` holds the launch code shared by ``tools/train.py`` and ``tools/test.py`` (it also makes MMEngine's
local checkpoint writes atomic for the run: ``atomic_io``); ``compat`` the mmcv shim and the checkpoint trust
boundary.
"""
import logging

from .compat import ensure_mmcv_ops

ensure_mmcv_ops()  # before anything imports mmseg: mmcv-lite has no compiled ops

from mmengine.logging import MMLogger  # noqa: E402
from mmengine.registry import MODELS  # noqa: E402

from backbones import InternViT  # noqa: E402

MODELS.register_module(name='InternViT', module=InternViT, force=True)


class _ToMMEngineLogger(logging.Handler):
    """Hands records of the torch-only packages to MMEngine's current logger (its console and log file)."""

    def emit(self, record: logging.LogRecord) -> None:
        mm_logger = MMLogger.get_current_instance()
        if record.levelno >= mm_logger.getEffectiveLevel():
            mm_logger.handle(record)


def _route_package_logs() -> None:
    for name in ('backbones', 'chat'):
        package_logger = logging.getLogger(name)
        if not any(isinstance(h, _ToMMEngineLogger) for h in package_logger.handlers):
            package_logger.addHandler(_ToMMEngineLogger())
        if package_logger.level == logging.NOTSET:
            package_logger.setLevel(logging.INFO)


_route_package_logs()

__all__ = ['InternViT', 'ensure_mmcv_ops']
