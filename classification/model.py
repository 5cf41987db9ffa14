"""The probe model: a frozen InternViT, token summaries (and tokens), and one or many heads (BN + Linear, or
attention pooling + BN + Linear), each with an EMA copy when ``ema_decay`` is set.

Checkpoints hold the heads, their EMA copies and the selected head, never the frozen backbone; they carry the
backbone's identity (sha256 of its weights, the pretrained path, the architecture) as the model's extra state,
so heads cannot be loaded onto a different backbone by any loading path (``load_from``, ``--resume``, evaluation).
Loading is strict on every path: see ``checkpoint.py`` (which also reads the published InternVL head file).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
from typing import Sequence

import torch
from mmengine.logging import print_log
from mmengine.model import BaseDataPreprocessor, BaseModel
from mmengine.registry import MODELS
from torch import nn

from backbones.internvit import IMAGENET_MEAN, IMAGENET_STD

from .backbone_identity import backbone_identity
from .checkpoint import check_head_state, is_published_layout, published_to_probe_state
from .heads import FeatureSpec, ProbeHead, head_losses, summarize_tokens

AUTOCAST_DTYPES = {'float16': torch.float16, 'fp16': torch.float16, 'bfloat16': torch.bfloat16,
                   'bf16': torch.bfloat16}

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
    """Frozen backbone -> features -> head(s), for one head or a sweep of heads sharing each backbone pass.

    Args:
        backbone: config of a frozen ``InternViT`` (``frozen=True``; ``dtype='bfloat16'`` on GPU, or ``dtype=None``
            with ``autocast='float16'`` as the published probe ran).
        num_classes: classes of the linear layer (1000 for ImageNet).
        feature: the single head's feature choice (see ``FeatureSpec.parse``): ``'cls_mean'`` is the published
            linear probe, ``'attention_pooling'`` the published attention-pooling probe.
        lr: the single head's learning rate for a batch of 512 images (``auto_scale_lr`` scales it).
        sweep: the switch. False: one head (``feature``, ``lr``). True: one head per
            (feature, lr) in ``sweep_features`` x ``sweep_lrs``, all trained on every batch from one backbone
            pass; ``HeadSelectionHook`` picks the best on the held-out split.
        sweep_lrs / sweep_features: the sweep's grid (default: 13 lrs from 0.001 to 10 around the published
            0.1, and cls_mean, cls, mean, cls_mean_last4).
        head_norm: BatchNorm before the Linear (published); False for the older published head (Linear only).
        mixup: timm ``Mixup`` arguments (mixup/cutmix of the images of a training batch), or None.
        label_smoothing: of the training targets (with or without mixup); the loss is soft-target cross entropy.
        ema_decay: keep an EMA copy of every head (updated after each optimizer step by ``HeadEMAHook``),
            evaluated and checkpointed beside the plain head; None: no EMA.
        autocast: run the backbone under ``torch.autocast`` in this dtype (``'float16'``: the published probe's
            fp32 weights + fp16 autocast); None: the backbone's own ``dtype``. Heads always run in fp32.
        data_preprocessor: defaults to ``ProbeDataPreprocessor`` with ImageNet mean/std.
    """

    def __init__(self, backbone: dict | nn.Module, num_classes: int = 1000, feature: str = 'cls_mean',
                 lr: float = 0.1, sweep: bool = False, sweep_lrs: Sequence[float] = DEFAULT_SWEEP_LRS,
                 sweep_features: Sequence[str] = DEFAULT_SWEEP_FEATURES, head_norm: bool = True,
                 mixup: dict | None = None, label_smoothing: float = 0.0, ema_decay: float | None = None,
                 autocast: str | None = None, data_preprocessor: dict | None = None, init_cfg=None):
        super().__init__(data_preprocessor=data_preprocessor or dict(type='ProbeDataPreprocessor'),
                         init_cfg=init_cfg)
        self.backbone = MODELS.build(backbone) if isinstance(backbone, dict) else backbone
        if not getattr(self.backbone, 'frozen', False):
            raise ValueError('LinearProbe needs a frozen backbone: set frozen=True in the backbone config')
        self.num_classes = int(num_classes)
        embed_dim = self.backbone.embed_dim
        num_heads = getattr(getattr(self.backbone, 'arch', None), 'num_heads', None)
        self.heads = nn.ModuleList(ProbeHead(f, embed_dim, self.num_classes, v, norm=head_norm, num_heads=num_heads)
                                   for f, v in head_grid(feature, lr, sweep, sweep_lrs, sweep_features))
        self.sweep = sweep  # the switch: HeadSelectionHook needs held-out data exactly when it is on
        self.summary_layers = max(head.feature.summary_layers for head in self.heads)
        self.needs_tokens = any(head.feature.needs_tokens for head in self.heads)
        if self.summary_layers > self.backbone.depth:
            raise ValueError(f'a head needs the last {self.summary_layers} layers, but the backbone has '
                             f'{self.backbone.depth}')
        if ema_decay is not None and not 0.0 < float(ema_decay) < 1.0:
            raise ValueError(f'ema_decay must be in (0, 1) or None, got {ema_decay}')
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.ema_heads = None
        if self.ema_decay is not None:
            self.ema_heads = copy.deepcopy(self.heads).requires_grad_(False)
        # False after loading a published head file that holds no EMA weights: only the plain head is evaluated.
        self.ema_available = self.ema_heads is not None
        self.mixup = None
        if mixup:
            from timm.data import Mixup
            self.mixup = Mixup(**mixup, label_smoothing=float(label_smoothing), num_classes=self.num_classes)
        self.label_smoothing = float(label_smoothing)
        if autocast is not None and str(autocast) not in AUTOCAST_DTYPES:
            raise ValueError(f'autocast must be one of {sorted(AUTOCAST_DTYPES)} or None, got {autocast!r}')
        self.autocast = None if autocast is None else AUTOCAST_DTYPES[str(autocast)]
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
        self.selection = self._checked_record(state).get('selection')

    def _checked_record(self, state) -> dict:
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
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Strict on every path (torch's load_state_dict, MMEngine's load_checkpoint with strict=False, the
        # runner): the model's own entries are checked, and a published head file is converted, before loading.
        own = {k[len(prefix):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
        state_dict.update({prefix + k: v for k, v in self._checked_probe_state(own).items()})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _expected_head_state(self) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in self.state_dict().items() if k != '_extra_state'}

    def _checked_probe_state(self, state: dict) -> dict:
        """``state`` (the model's entries of a checkpoint) checked against the heads, in this model's names."""
        state = {k: v for k, v in state.items() if not k.startswith('backbone.')}  # the backbone loads elsewhere
        if is_published_layout(state):
            return self.probe_state_from_published(state)
        expected = self._expected_head_state()
        if '_extra_state' not in state:
            raise ValueError('checkpoint has no linear-probe record (_extra_state with the backbone hash) and is '
                             'not the published head layout (model -> norm.*, head.*); it was not written by '
                             'LinearProbe, so its heads cannot be checked against the backbone')
        record = self._checked_record(state['_extra_state'])  # the backbone and the head names first: clearest
        hint = ''
        if self.ema_heads is not None and not any(k.startswith('ema_heads.') for k in state):
            hint = 'The checkpoint has no EMA heads: set model.ema_decay=None to load it'
        elif self.ema_heads is None and any(k.startswith('ema_heads.') for k in state):
            hint = 'The checkpoint has EMA heads: set model.ema_decay as in the training config'
        check_head_state(expected, {k: v for k, v in state.items() if k != '_extra_state'}, hint=hint)
        self.ema_available = self.ema_heads is not None and record.get('ema_available', True)
        return state

    def probe_state_from_published(self, state: dict) -> dict:
        """The published InternVL head file (``{'model': {...}, 'model_ema': ...}``) as this model's complete
        state (heads, EMA heads, selected head, record), checked strictly against the heads. Its record is this
        model's own: the file has none, so the config's backbone must be the one the head was trained on."""
        converted, has_ema = published_to_probe_state(state, self.head_names, self.ema_heads is not None,
                                                      self._expected_head_state())
        self.ema_available = self.ema_heads is not None and has_ema
        print_log('published InternVL probe head: no backbone record to check, so the config\'s backbone '
                  f'must be the one it was trained on ({self.backbone_identity().get("pretrained")})'
                  + ('' if self.ema_available or self.ema_heads is None else
                     '; the file holds no EMA weights, so only the plain head is evaluated'), logger='current')
        # ema_available travels in the record, so that loading this state again keeps the plain head only
        record = encode_record(dict(self.probe_record(), ema_available=self.ema_available))
        return dict(converted, selected_head=self.selected_head.clone(), _extra_state=record)

    # ------------------------------------------------------------------------------------------------ forward
    def _backbone_context(self, images: torch.Tensor):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=images.device.type, dtype=self.autocast)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalized images -> (summaries ``[B, L, 2, C]`` of the last L layers, the last layer's tokens
        ``[B, 1+N, C]`` when a head reads them, else None), both float32."""
        self.backbone_images_processed += images.shape[0]
        layers_needed = max(self.summary_layers, 1)
        with self._backbone_context(images):
            if layers_needed == 1:
                layers = [self.backbone.forward_features(images)]
            else:
                indices = list(range(-layers_needed, 0))
                layers = self.backbone.forward_intermediates(images, indices, 'tokens', with_cls=True)
        tokens = layers[-1].float() if self.needs_tokens else None
        return summarize_tokens(layers), tokens

    def summaries(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images -> ``[B, L, 2, C]`` (cls, mean of patches) of the last L layers, float32."""
        return self.features(images)[0]

    def head_logits(self, summaries: torch.Tensor, heads: Sequence[int] | None = None,
                    tokens: torch.Tensor | None = None, ema: bool = False) -> torch.Tensor:
        """``[H, B, K]`` logits of the given heads (all by default), or of their EMA copies."""
        modules = self.ema_heads if ema else self.heads
        chosen = range(len(modules)) if heads is None else heads
        return torch.stack([modules[i](summaries, tokens) for i in chosen])

    def training_targets(self, inputs: torch.Tensor, labels: torch.Tensor, input_kind: str):
        """(inputs, ``[B, K]`` target distributions): mixup/cutmix of the images and label smoothing."""
        if self.mixup is not None:
            if input_kind != 'images':
                raise ValueError('model.mixup mixes images, but this batch holds cached summaries; set '
                                 'model.mixup=None for a feature-cache run')
            if inputs.shape[0] % 2:
                raise ValueError(f'mixup needs an even batch, got {inputs.shape[0]}; set drop_last=True and an '
                                 f'even batch size')
            return self.mixup(inputs, labels)
        from timm.data.mixup import mixup_target
        return inputs, mixup_target(labels, self.num_classes, smoothing=self.label_smoothing)

    @torch.no_grad()
    def update_ema(self) -> None:
        """EMA step of every head: floating tensors (weights and BN statistics) interpolate, counters copy
        (timm's ``ModelEmaV3`` with buffers)."""
        if self.ema_heads is None:
            return
        for ema, live in zip(self.ema_heads.state_dict().values(), self.heads.state_dict().values()):
            if ema.is_floating_point():
                ema.lerp_(live, 1.0 - self.ema_decay)
            else:
                ema.copy_(live)

    def forward(self, inputs: torch.Tensor, data_samples: dict | None = None, mode: str = 'tensor',
                input_kind: str = 'images'):
        if mode == 'loss':
            inputs, targets = self.training_targets(inputs, data_samples['labels'], input_kind)
        summaries, tokens = self.features(inputs) if input_kind == 'images' else (inputs, None)
        if mode == 'loss':
            losses = head_losses(self.head_logits(summaries, tokens=tokens), targets)
            # Summed: each head's parameters only see their own loss, so each gets its own full gradient. The
            # logged `loss` is that sum; `ce_mean` / `ce_min` (not optimized) read like a single head's loss.
            return dict(loss=losses.sum(), ce_mean=losses.detach().mean(), ce_min=losses.detach().min())
        if self.predict_all_heads:
            logits, names = self.head_logits(summaries, tokens=tokens), [f'head{i}' for i in range(len(self.heads))]
            names[0] = ''
        else:
            selected = [int(self.selected_head)]
            logits, names = self.head_logits(summaries, selected, tokens), ['']
            if self.ema_heads is not None and self.ema_available:
                logits = torch.cat([logits, self.head_logits(summaries, selected, tokens, ema=True)])
                names.append('ema')
        if mode == 'tensor':
            return logits
        if mode == 'predict':
            return self._predictions(logits, names, data_samples)
        raise ValueError(f"mode must be 'loss', 'predict' or 'tensor', got {mode!r}")

    @staticmethod
    def _predictions(logits: torch.Tensor, names: list[str], data_samples: dict) -> list[dict]:
        logits = logits.float().transpose(0, 1).cpu()  # [B, H, K]
        labels = data_samples['labels'].cpu().tolist()
        real = data_samples.get('real_labels')
        indices = data_samples['indices'].cpu().tolist()
        return [dict(logits=logits[i], names=names, label=labels[i], index=indices[i],
                     real_labels=None if real is None else real[i]) for i in range(len(labels))]


def _drop_backbone_from_state_dict(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + 'backbone.')]:
        del state_dict[key]


def _ignore_missing_backbone_keys(module, incompatible_keys):
    # The frozen backbone comes from its own weights file, never from a probe checkpoint.
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not (k.startswith('backbone.') or '.backbone.' in k)]


def published_head_to_probe_state(state_dict: dict, model: nn.Module) -> dict:
    """Strict loading's converter (``mm_adapter.strict_loading.register_converter``): the published InternVL
    head file, loaded into a ``LinearProbe``, becomes its probe state; anything else passes unchanged."""
    if isinstance(model, LinearProbe) and is_published_layout(state_dict):
        return model.probe_state_from_published(state_dict)
    return state_dict
