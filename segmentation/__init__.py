"""Semantic segmentation with InternViT on MMSegmentation 1.x / MMEngine.

Importing this package registers, in mmseg's registries (and MMEngine's root registries where a runner looks
them up without scope):

- ``ViTFeaturePyramid`` (neck): four scales from one ViT grid, one per requested layer;
- ``LinearBNHead`` (decode head): BatchNorm + 1x1 conv, the published linear probe;
- ``InternViTLayerDecayOptimizerConstructor``: layer-wise lr decay over InternViT's parameter names;
- ``CheckedADE20KDataset`` (with few-shot ``fraction``), ``SyntheticADE20KDataset``, ``LoadAndCheckAnnotations``,
  ``ResizeShortSide`` (the published test resize);
- ``PolyLRWithLinearWarmup``: mmcv 1.x's poly lr policy with linear warm-up, as the published recipes ran it;
- ``InternViTBlockFSDP`` (model wrapper): FSDP with one shard unit per InternViT block, blocks in bf16;
- strategies ``InternViTFSDPStrategy`` and ``InternViTDeepSpeedStrategy`` (ZeRO-3): start-up with the backbone on the
  meta device, each rank writing only its shards (``sharded_startup``);
- ``IoUTableMetric``: mmseg's IoUMetric + the per-class table as CSV/JSON next to the log;
- hooks ``SegOverlayHook`` (prediction overlays as PNG) and ``RankConsistencyHook``;
- the published segmentor layout (``published_layout``), registered with strict loading (``mm_adapter``).

"""
import mm_adapter  # noqa: F401  (applies the mmcv.ops shim before mmseg is imported, registers InternViT)
from mm_adapter.compat import trust_checkpoints_in  # noqa: E402
from mm_adapter.strict_loading import register_converter  # noqa: E402

from .datasets import (  # noqa: E402
    CheckedADE20KDataset,
    LoadAndCheckAnnotations,
    ResizeShortSide,
    SyntheticADE20KDataset,
    few_shot_subset,
)
from .fsdp import InternViTBlockFSDP, InternViTFSDPStrategy  # noqa: E402
from .heads import LinearBNHead  # noqa: E402
from .hooks import RankConsistencyHook, SegOverlayHook  # noqa: E402
from .layer_decay import InternViTLayerDecayOptimizerConstructor, internvit_layer_id  # noqa: E402
from .metrics import IoUTableMetric  # noqa: E402
from .neck import ViTFeaturePyramid  # noqa: E402
from .published_layout import to_project_names  # noqa: E402
from .schedules import PolyLRWithLinearWarmup  # noqa: E402
from .sharded_startup import InternViTDeepSpeedStrategy  # noqa: E402

register_converter(to_project_names)  # strict loading reads the published segmentor layout too

# Checkpoints read outside tools/train.py (mmseg.apis.init_model, MMSegInferencer, tools/image_demo.py) load weights
# only; a training entry point later trusts its own work dir for resuming (mm_adapter.compat.trust_checkpoints_in).
trust_checkpoints_in(None)

__all__ = ['ViTFeaturePyramid', 'LinearBNHead', 'InternViTLayerDecayOptimizerConstructor', 'internvit_layer_id',
           'CheckedADE20KDataset', 'SyntheticADE20KDataset', 'LoadAndCheckAnnotations', 'few_shot_subset',
           'InternViTBlockFSDP', 'InternViTFSDPStrategy', 'InternViTDeepSpeedStrategy', 'SegOverlayHook',
           'RankConsistencyHook', 'ResizeShortSide', 'PolyLRWithLinearWarmup', 'IoUTableMetric']
