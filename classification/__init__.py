"""ImageNet linear probes on a frozen InternViT (MMEngine): model and sweep, feature cache, datasets, metrics.

Importing the package registers everything in MMEngine's root registries (configs use
``custom_imports=dict(imports=['mm_adapter', 'classification'])``).
"""
import mm_adapter  # noqa: F401  (registers InternViT in MMEngine's registry)
from mm_adapter.strict_loading import register_converter

from .backbone_identity import backbone_identity, weights_sha256
from .checkpoint import PUBLISHED_FILE_OBJECTS, ProbeCheckpointError, read_probe_checkpoint
from .datasets import (
    DatasetLayoutError,
    HeldOutSplit,
    ImageNetFileList,
    ImageNetFolder,
    ImageNetReaL,
    ImageNetV2Folder,
    ImageReadError,
    probe_collate,
    published_class_subset,
    read_class_list,
    stratified_holdout,
)
from .feature_cache import CachedFeatures, StaleFeatureCacheError, manifest_differences, prepare_feature_caches
from .heads import AttentionPooling, FeatureSpec, ProbeBatchNorm, ProbeHead, summarize_tokens
from .hooks import FeatureCacheHook, HeadEMAHook, HeadSelectionHook, ProbeCheckpointHook
from .loops import MissingEvaluationSetError, MultiSetTestLoop, format_results_table
from .metrics import ImageNetAccuracy, topk_hits
from .model import (
    DEFAULT_SWEEP_FEATURES,
    DEFAULT_SWEEP_LRS,
    BackboneMismatchError,
    LinearProbe,
    ProbeDataPreprocessor,
    probe_record,
    published_head_to_probe_state,
)
from .optim import LinearProbeOptimWrapperConstructor, ProbeOptimWrapper
from .runner import ProbeRunner, apply_sweep_switch
from .schedule import TimmCosineLR
from .transforms import ProbeEvalTransform, ProbeTrainTransform

# load_from / tools/test.py read the published InternVL head file too (strict loading, as every runner)
register_converter(published_head_to_probe_state, stand_ins=PUBLISHED_FILE_OBJECTS)

__all__ = [
    'LinearProbe', 'ProbeDataPreprocessor', 'BackboneMismatchError', 'probe_record', 'DEFAULT_SWEEP_LRS',
    'DEFAULT_SWEEP_FEATURES',
    'FeatureSpec', 'ProbeBatchNorm', 'ProbeHead', 'summarize_tokens', 'backbone_identity', 'weights_sha256',
    'ImageNetFolder', 'ImageNetFileList', 'ImageNetV2Folder', 'ImageNetReaL', 'HeldOutSplit', 'stratified_holdout',
    'read_class_list', 'probe_collate', 'DatasetLayoutError', 'ImageReadError', 'CachedFeatures',
    'StaleFeatureCacheError', 'manifest_differences', 'prepare_feature_caches', 'FeatureCacheHook',
    'HeadSelectionHook', 'MultiSetTestLoop', 'format_results_table', 'ImageNetAccuracy', 'topk_hits',
    'LinearProbeOptimWrapperConstructor', 'ProbeTrainTransform', 'ProbeEvalTransform', 'ProbeRunner',
    'apply_sweep_switch', 'AttentionPooling', 'HeadEMAHook', 'ProbeCheckpointError', 'read_probe_checkpoint',
    'ProbeOptimWrapper', 'TimmCosineLR', 'ProbeCheckpointHook', 'MissingEvaluationSetError',
    'published_class_subset',
]
