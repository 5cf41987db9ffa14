"""The layout of the published InternViT-6B ADE20K segmentors (InternVL's ``segmentation/``, mmseg 0.x).

The eight released files are mmseg-0.x segmentor state dicts, bare or ``{'meta': ..., 'state_dict': ...}``:
  * ``backbone.*``: InternViT in the original ``.pth`` names (``cls_token``, ``pos_embed`` [1, 1+36*36, C],
    ``blocks.N.ls1.gamma`` ...), which ``backbones.layouts`` reads as its ``original`` layout;
  * ``backbone.up1.{0,1,3}.*`` / ``backbone.up2.0.*``: the UperNet settings' x4 / x2 pyramid branches, kept inside
    the published backbone; here they are ``ViTFeaturePyramid`` branches 0 and 1 (``neck.branches.{0,1}``, same
    sub-indices: ConvTranspose2d, LayerNorm, GELU, ConvTranspose2d). ``up3`` (x1) and ``up4`` (x1/2) have no
    weights;
  * ``decode_head.*`` / ``auxiliary_head.*``: mmseg's UPerHead / FCNHead, whose names mmseg 1.x kept; the linear
    settings' ``decode_head.norm.*`` (BatchNorm) and ``decode_head.conv_seg.*`` are ``LinearBNHead``'s names.

``to_project`` maps such a state dict (or any segmentor state dict whose backbone is in a layout
``backbones.layouts`` reads) onto the project's names; a state dict already in them comes back unchanged.
``to_published`` is the inverse, for writing files the published code reads.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import torch

from backbones.layouts import LAYOUTS, WeightsError, detect_layout, from_canonical, to_canonical

BACKBONE = 'backbone.'
NECK = 'neck.branches.'
# Published pyramid branch (backbone.up1 .. up4) <-> ViTFeaturePyramid branch index (scales 4, 2, 1, 0.5).
_PUBLISHED_BRANCH = re.compile(r'^backbone\.up([1-4])\.(.+)$')
_PROJECT_BRANCH = re.compile(r'^neck\.branches\.([0-3])\.(.+)$')


def to_project(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Segmentor state dict in the published layout (or the project's) -> the project's names.

    Backbone tensors the layout reader does not recognise keep their names, so that strict loading reports them.
    """
    return _map_segmentor(state_dict, _PUBLISHED_BRANCH, lambda m: f'{NECK}{int(m.group(1)) - 1}.{m.group(2)}',
                          lambda backbone: {BACKBONE + k: v for k, v in _backbone_to_canonical(backbone).items()})


def to_published(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The project's segmentor state dict -> the published layout (original backbone names, ``backbone.upN``)."""
    return _map_segmentor(state_dict, _PROJECT_BRANCH, lambda m: f'{BACKBONE}up{int(m.group(1)) + 1}.{m.group(2)}',
                          lambda backbone: from_canonical(backbone, 'original', prefix=BACKBONE))


def _map_segmentor(state_dict: Mapping[str, torch.Tensor], branch: re.Pattern,
                   branch_name: Callable[[re.Match], str],
                   map_backbone: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> dict:
    """``state_dict`` with the pyramid branches matching ``branch`` renamed by ``branch_name``, the backbone's
    tensors (``backbone.*``, passed without the prefix) replaced by what ``map_backbone`` makes of them, and
    every other tensor unchanged."""
    out: dict[str, torch.Tensor] = {}
    backbone: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = branch.match(key)
        if match:
            out[branch_name(match)] = value
        elif key.startswith(BACKBONE):
            backbone[key[len(BACKBONE):]] = value
        else:
            out[key] = value
    out.update(map_backbone(backbone))
    return out


def to_project_names(state_dict: Mapping[str, torch.Tensor], model=None) -> dict[str, torch.Tensor]:
    """``to_project`` as strict loading's converter (``mm_adapter.strict_loading.register_converter``); the
    mapping is the same for every segmentor ``model``."""
    return to_project(state_dict)


def _backbone_to_canonical(backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    try:
        prefix, layout = detect_layout(backbone)
    except WeightsError:
        return backbone  # not an InternViT: nothing to map
    if (prefix, layout) == ('', 'hf'):
        return backbone  # already the project's names
    namespaces = LAYOUTS[layout].namespaces
    inside = {k: v for k, v in backbone.items()
              if k.startswith(prefix) and k[len(prefix):].split('.', 1)[0] in namespaces}
    canonical, _ = to_canonical(inside)
    leftover = {k: v for k, v in backbone.items() if k not in inside}
    clash = sorted(set(canonical) & set(leftover))
    if clash:
        raise WeightsError(f'backbone tensors in two layouts map to the same names: {", ".join(clash[:5])}')
    return {**canonical, **leftover}
