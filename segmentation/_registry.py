"""Register a class in mmseg's registry and in MMEngine's root registry of the same kind.

mmseg configs run with ``default_scope='mmseg'`` and find both; configs of other packages (classification) and
MMEngine's own builders (FlexibleRunner strategies, optimizer wrappers) look in the root registry.
"""
from mmengine import registry as engine_registry
from mmseg import registry as seg_registry


def register_everywhere(kind: str):
    """Class decorator: register in ``mmseg.registry.<kind>`` and ``mmengine.registry.<kind>``."""
    def decorator(obj):
        for module in (seg_registry, engine_registry):
            getattr(module, kind).register_module(module=obj, force=True)
        return obj
    return decorator
