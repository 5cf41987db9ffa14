"""Image transforms of the published linear probe (PIL in, uint8 CHW tensor out; normalization happens on device).

Train: RandomResizedCrop(size, bicubic) + horizontal flip. Eval: Resize(shorter side to ``resize``, bicubic) +
CenterCrop(size), with ``resize = size`` in the published recipe. Each transform describes itself in one
canonical line, which the feature cache records in its manifest.
"""
from __future__ import annotations

from mmengine.registry import TRANSFORMS
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor

_INTERPOLATIONS = {'bicubic': T.InterpolationMode.BICUBIC, 'bilinear': T.InterpolationMode.BILINEAR,
                   'nearest': T.InterpolationMode.NEAREST}


def _interpolation(name: str) -> T.InterpolationMode:
    if name not in _INTERPOLATIONS:
        raise ValueError(f'interpolation must be one of {sorted(_INTERPOLATIONS)}, got {name!r}')
    return _INTERPOLATIONS[name]


@TRANSFORMS.register_module()
class ProbeTrainTransform:
    """RandomResizedCrop + RandomHorizontalFlip (the published linear-probe augmentation)."""

    deterministic = False

    def __init__(self, size: int = 224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation: str = 'bicubic',
                 flip: bool = True):
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)
        self.interpolation, self.flip = interpolation, flip
        steps = [T.RandomResizedCrop(self.size, scale=self.scale, ratio=self.ratio,
                                     interpolation=_interpolation(interpolation))]
        if flip:
            steps.append(T.RandomHorizontalFlip())
        self.transform = T.Compose(steps)

    def __call__(self, image: Image.Image):
        return pil_to_tensor(self.transform(image))

    def describe(self) -> str:
        return (f'random_resized_crop(size={self.size}, scale={list(self.scale)}, ratio={list(self.ratio)}, '
                f'interpolation={self.interpolation}), flip={self.flip}')


@TRANSFORMS.register_module()
class ProbeEvalTransform:
    """Resize the shorter side to ``resize`` (default ``size``) then center-crop ``size``."""

    deterministic = True

    def __init__(self, size: int = 224, resize: int | None = None, interpolation: str = 'bicubic'):
        self.size = int(size)
        self.resize = int(resize or size)
        self.interpolation = interpolation
        self.transform = T.Compose([T.Resize(self.resize, interpolation=_interpolation(interpolation)),
                                    T.CenterCrop(self.size)])

    def __call__(self, image: Image.Image):
        return pil_to_tensor(self.transform(image))

    def describe(self) -> str:
        return f'resize(shorter={self.resize}, interpolation={self.interpolation}), center_crop({self.size})'


def build_pipeline(pipeline):
    """A transform from its config dict (or an already built callable)."""
    if pipeline is None:
        raise ValueError('a dataset needs a pipeline, e.g. dict(type="ProbeEvalTransform", size=224)')
    return TRANSFORMS.build(pipeline) if isinstance(pipeline, dict) else pipeline


def describe_pipeline(pipeline) -> str:
    describe = getattr(pipeline, 'describe', None)
    return describe() if callable(describe) else repr(pipeline)
