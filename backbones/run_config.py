"""The InternViT a training run was built with, read from the config text MMEngine stores in its checkpoints.

MMEngine writes the run's whole config as Python source into ``checkpoint['meta']['cfg']``. That text comes from a
file like any other, so it is never executed: it is parsed with ``ast`` and only literals, ``dict(...)`` calls,
lists, tuples and signed numbers are evaluated; anything else (a name, an expression) is left out.
"""
from __future__ import annotations

import ast
from dataclasses import fields
from typing import Any, Iterator

from .presets import InternViTArch, resolve_arch

__all__ = ['assigned_value', 'backbone_config_from_text', 'arch_from_backbone_config']

_UNKNOWN = object()


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        values = [_literal(v) for v in node.elts]
        return _UNKNOWN if _UNKNOWN in values else (list(values) if isinstance(node, ast.List) else tuple(values))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
            and isinstance(node.operand.value, (int, float)):
        return -node.operand.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'dict' and not node.args:
        return {kw.arg: value for kw in node.keywords if kw.arg is not None
                for value in [_literal(kw.value)] if value is not _UNKNOWN}
    if isinstance(node, ast.Dict):
        out = {}
        for key, value in zip(node.keys, node.values):
            key, value = (_UNKNOWN if key is None else _literal(key)), _literal(value)
            if isinstance(key, str) and value is not _UNKNOWN:
                out[key] = value
        return out
    return _UNKNOWN


def _internvit_dicts(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        if node.get('type') == 'InternViT':
            yield node
        for value in node.values():
            yield from _internvit_dicts(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _internvit_dicts(value)


def assigned_value(text: str, name: str) -> Any:
    """The literal value of the top-level ``name = ...`` in a config's source text (None if absent or unreadable)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name
                                                     for t in statement.targets):
            value = _literal(statement.value)
            return None if value is _UNKNOWN else value
    return None


def backbone_config_from_text(text: str) -> dict | None:
    """The ``type='InternViT'`` dict inside the ``model = ...`` of a config's source text (None if not exactly one)."""
    found = list(_internvit_dicts(assigned_value(text, 'model')))
    return found[0] if len(found) == 1 else None


def arch_from_backbone_config(backbone: dict) -> InternViTArch | None:
    """The architecture an ``InternViT`` config dict builds (its preset with the arch fields it overrides)."""
    names = {f.name for f in fields(InternViTArch)}
    try:
        return resolve_arch(backbone.get('preset'), **{k: v for k, v in backbone.items() if k in names})
    except (ValueError, TypeError, KeyError):
        return None
