"""The linear-probe model: a frozen InternViT, token summaries, and one or many BN + Linear heads.

Checkpoints hold the heads (BN + Linear) and the selected head, never the frozen backbone; they carry the
backbone's identity (sha256 of its weights, the pretrained path, the architecture) as the model's extra state,
so heads cannot be loaded onto a different backbone by any loading path (``load_from``, ``--resume``, evaluation).
"""
from __future__ import annotations

import itertools
import json
from typing import Sequence

import torch
from mmengine.model import BaseDataPreprocessor, BaseModel
from mmengine.registry import MODELS
from torch import nn

from backbones.internvit import IMAGENET_MEAN, IMAGENET_STD

from .backbone_identity import backbone_identity
from .heads import FeatureSpec, ProbeHead, head_losses, summarize_tokens

# A 13-point log grid around the published lr 0.1 (per 512 images), and the feature choices worth comparing.
DEFAULT_SWEEP_LRS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
DEFAULT_SWEEP_FEATURES = ('cls_mean', 'cls', 'mean', 'cls_mean_last4')
CHECKPOINT_FORMAT = 'internvit-linear-probe/1'


def encode_record(record: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(record, sort_keys=True).encode()), dtype=torch.uint8).clone()


def decode_record(state) -> dict:
    """The probe record (backbone identity, heads, selection) of a state dict's ``_extra_state`` entry."""
    if isinstance(state, torch.Tensor):
        return json.loads(bytes(state.cpu().numpy().tobytes()).decode())
    if isinstance(state, dict):
        return state
    raise ValueError(f'checkpoint extra state is not a linear-probe record: {type(state).__name__}')


def probe_record(state_dict: dict) -> dict:
    """Read the record of a probe checkpoint's state dict: ``probe_record(torch.load(f)['state_dict'])``."""
    if '_extra_state' not in state_dict:
        raise ValueError('state dict has no linear-probe record (_extra_state)')
    return decode_record(state_dict['_extra_state'])


class BackboneMismatchError(RuntimeError):
    """Heads from a checkpoint were trained on another backbone than the one they are being loaded onto."""


@MODELS.register_module()
class ProbeDataPreprocessor(BaseDataPreprocessor):
    """Moves a collated batch to the device; images (uint8) are scaled to [0, 1] and normalized, summaries from
    the feature cache pass through as float32."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 non_blocking: bool = True):
        super().__init__(non_blocking=non_blocking)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f'mean and std need 3 values (RGB), got mean={mean} std={std}')
        self.mean_values, self.std_values = tuple(map(float, mean)), tuple(map(float, std))
        self.register_buffer('mean', torch.tensor(self.mean_values).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer('std', torch.tensor(self.std_values).view(1, 3, 1, 1) * 255, persistent=False)

    def describe(self) -> str:
        return f'normalize(mean={list(self.mean_values)}, std={list(self.std_values)})'

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        inputs, kind = data['inputs'], data['input_kind']
        if kind == 'images':
            inputs = (inputs.float() - self.mean) / self.std
        elif kind == 'summaries':
            inputs = inputs.float()
        else:
            raise ValueError(f"input_kind must be 'images' or 'summaries', got {kind!r}")
        return dict(inputs=inputs, data_samples=data['data_samples'], input_kind=kind)


def head_grid(feature, lr, sweep: bool, sweep_lrs, sweep_features) -> list[tuple[FeatureSpec, float]]:
    """(feature, lr) for every head: the single published head, or the sweep's features x lrs."""
    if not isinstance(sweep, bool):
        raise TypeError(f'sweep is the on/off switch (True or False), got {sweep!r}; the grid is given by '
                        f'sweep_lrs and sweep_features')
    if not sweep:
        return [(FeatureSpec.parse(feature), float(lr))]
    lrs = [float(v) for v in sweep_lrs]
    features = [FeatureSpec.parse(f) for f in sweep_features]
    if not lrs or not features:
        raise ValueError(f'a sweep needs at least one lr and one feature, got sweep_lrs={list(sweep_lrs)} '
                         f'sweep_features={list(sweep_features)}')
    grid = [(f, v) for f, v in itertools.product(features, lrs)]
    if len(set(grid)) != len(grid):
        raise ValueError(f'the sweep repeats a (feature, lr) pair: sweep_lrs={lrs}, '
                         f'sweep_features={[f.name for f in features]}')
    return grid


@MODELS.register_module()
class LinearProbe(BaseModel):
    """Frozen backbone -> features -> BatchNorm -> Linear, for one head or a sweep of heads sharing each pass.

    Args:
        backbone: config of a frozen ``InternViT`` (``frozen=True``; ``dtype='bfloat16'`` on GPU).
        num_classes: classes of the linear layer (1000 for ImageNet).
        feature: the single head's feature choice (see ``FeatureSpec.parse``); ``'cls_mean'`` is published.
        lr: the single head's learning rate for a batch of 512 images (``auto_scale_lr`` scales it).
        sweep: the switch. False: one head (``feature``, ``lr``). True: one head per
            (feature, lr) in ``sweep_features`` x ``sweep_lrs``, all trained on every batch from one backbone
            pass; ``HeadSelectionHook`` picks the best on the held-out split.
        sweep_lrs / sweep_features: the sweep's grid (default: 13 lrs from 0.001 to 10 around the published
            0.1, and cls_mean, cls, mean, cls_mean_last4).
        data_preprocessor: defaults to ``ProbeDataPreprocessor`` with ImageNet mean/std.
    """

    def __init__(self, backbone: dict | nn.Module, num_classes: int = 1000, feature: str = 'cls_mean',
                 lr: float = 0.1, sweep: bool = False, sweep_lrs: Sequence[float] = DEFAULT_SWEEP_LRS,
                 sweep_features: Sequence[str] = DEFAULT_SWEEP_FEATURES, data_preprocessor: dict | None = None,
                 init_cfg=None):
        super().__init__(data_preprocessor=data_preprocessor or dict(type='ProbeDataPreprocessor'),
                         init_cfg=init_cfg)
        self.backbone = MODELS.build(backbone) if isinstance(backbone, dict) else backbone
        if not getattr(self.backbone, 'frozen', False):
            raise ValueError('LinearProbe needs a frozen backbone: set frozen=True in the backbone config')
        self.num_classes = int(num_classes)
        embed_dim = self.backbone.embed_dim
        self.heads = nn.ModuleList(ProbeHead(f, embed_dim, self.num_classes, v) for f, v in
                                   head_grid(feature, lr, sweep, sweep_lrs, sweep_features))
        self.sweep = sweep  # the switch: HeadSelectionHook needs held-out data exactly when it is on
        self.summary_layers = max(head.feature.layers for head in self.heads)
        if self.summary_layers > self.backbone.depth:
            raise ValueError(f'a head needs the last {self.summary_layers} layers, but the backbone has '
                             f'{self.backbone.depth}')
        # Index of the head used for prediction; set from held-out accuracy by HeadSelectionHook, saved with it.
        self.register_buffer('selected_head', torch.zeros((), dtype=torch.long))
        self.predict_all_heads = False
        self.selection: dict | None = None  # held-out record of HeadSelectionHook (which head, and why)
        self.backbone_images_processed = 0  # instrumentation: images that went through the backbone
        self._identity: dict | None = None
        self._register_state_dict_hook(_drop_backbone_from_state_dict)
        self.register_load_state_dict_post_hook(_ignore_missing_backbone_keys)

    # ------------------------------------------------------------------------------------------------ identity
    @property
    def head_names(self) -> list[str]:
        return [head.name for head in self.heads]

    def backbone_identity(self) -> dict:
        """sha256 of the backbone weights (cached per weights file, see backbone_identity.py), path and arch."""
        if self._identity is None:
            self._identity = backbone_identity(self.backbone)
        return self._identity

    def probe_record(self) -> dict:
        return dict(format=CHECKPOINT_FORMAT, backbone=self.backbone_identity(), heads=self.head_names,
                    num_classes=self.num_classes, selection=self.selection)

    def get_extra_state(self) -> torch.Tensor:
        # JSON bytes in a uint8 tensor: every state-dict consumer (DDP's broadcast at start, weights_to_cpu,
        # torch.load(weights_only=True)) handles a tensor, not all of them handle a dict.
        return encode_record(self.probe_record())

    def set_extra_state(self, state) -> None:
        state = decode_record(state)
        if state.get('format') != CHECKPOINT_FORMAT:
            raise ValueError(f'checkpoint extra state is not a linear-probe record ({CHECKPOINT_FORMAT}): {state!r}')
        theirs, ours = state['backbone'], self.backbone_identity()
        if theirs['sha256'] != ours['sha256']:
            raise BackboneMismatchError(
                f"these heads were trained on a backbone with sha256 {theirs['sha256']} "
                f"(pretrained={theirs.get('pretrained')}), but this model's backbone has sha256 {ours['sha256']} "
                f"(pretrained={ours.get('pretrained')}); loading heads onto a different backbone is refused")
        if list(state['heads']) != self.head_names or state['num_classes'] != self.num_classes:
            raise ValueError(f"checkpoint heads {state['heads']} ({state['num_classes']} classes) do not match "
                             f'this model\'s heads {self.head_names} ({self.num_classes} classes); set model.sweep, '
                             f'sweep_lrs, sweep_features / feature, lr as in the training config')
        self.selection = state.get('selection')

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + '_extra_state' not in state_dict:
            raise ValueError('checkpoint has no linear-probe record (_extra_state with the backbone hash); '
                             'it was not written by LinearProbe, so its heads cannot be checked against the backbone')
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------------------------------------ forward
    def summaries(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images -> ``[B, L, 2, C]`` (cls, mean of patches) of the last L layers, float32."""
        self.backbone_images_processed += images.shape[0]
        if self.summary_layers == 1:
            layers = [self.backbone.forward_features(images)]
        else:
            indices = list(range(-self.summary_layers, 0))
            layers = self.backbone.forward_intermediates(images, indices, 'tokens', with_cls=True)
        return summarize_tokens(layers)

    def head_logits(self, summaries: torch.Tensor, heads: Sequence[int] | None = None) -> torch.Tensor:
        """``[H, B, K]`` logits of the given heads (all by default)."""
        chosen = range(len(self.heads)) if heads is None else heads
        return torch.stack([self.heads[i](summaries) for i in chosen])

    def forward(self, inputs: torch.Tensor, data_samples: dict | None = None, mode: str = 'tensor',
                input_kind: str = 'images'):
        summaries = self.summaries(inputs) if input_kind == 'images' else inputs
        if mode == 'loss':
            losses = head_losses(self.head_logits(summaries), data_samples['labels'])
            # Summed: each head's parameters only see their own loss, so each gets its own full gradient. The
            # logged `loss` is that sum; `ce_mean` / `ce_min` (not optimized) read like a single head's loss.
            return dict(loss=losses.sum(), ce_mean=losses.detach().mean(), ce_min=losses.detach().min())
        heads = None if self.predict_all_heads else [int(self.selected_head)]
        logits = self.head_logits(summaries, heads)
        if mode == 'tensor':
            return logits
        if mode == 'predict':
            return self._predictions(logits, data_samples)
        raise ValueError(f"mode must be 'loss', 'predict' or 'tensor', got {mode!r}")

    @staticmethod
    def _predictions(logits: torch.Tensor, data_samples: dict) -> list[dict]:
        logits = logits.float().transpose(0, 1).cpu()  # [B, H, K]
        labels = data_samples['labels'].cpu().tolist()
        real = data_samples.get('real_labels')
        indices = data_samples['indices'].cpu().tolist()
        return [dict(logits=logits[i], label=labels[i], index=indices[i],
                     real_labels=None if real is None else real[i]) for i in range(len(labels))]


def _drop_backbone_from_state_dict(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + 'backbone.')]:
        del state_dict[key]


def _ignore_missing_backbone_keys(module, incompatible_keys):
    # The frozen backbone comes from its own weights file, never from a probe checkpoint.
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not (k.startswith('backbone.') or '.backbone.' in k)]
