"""Helpers shared by several test modules (``from helpers import ...``: pytest puts tests/ on ``sys.path``)."""
import os.path as osp
import runpy

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY_BACKBONE = dict(type='InternViT', preset='internvit_tiny', frozen=True)


def randomized(preset='internvit_tiny', seed=0, **overrides):
    """A tiny InternViT whose every parameter is random (norm weights and layer scales included)."""
    from backbones.internvit import InternViT
    torch.manual_seed(seed)
    model = InternViT(preset, **overrides).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            one = name.endswith(('norm1.weight', 'norm2.weight', 'q_norm.weight', 'k_norm.weight'))
            p.normal_(1.0 if one else 0.0, 0.3 if name.endswith(('ls1', 'ls2')) else 0.1)
    return model


def toy_regression_model():
    """A one-layer MMEngine model (squared error) for runner mechanics; mmengine.model imported only when called."""
    from mmengine.model import BaseModel
    from torch import nn

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 1)

        def forward(self, inputs, targets, mode='tensor'):
            pred = self.linear(inputs)
            return dict(loss=((pred - targets) ** 2).mean()) if mode == 'loss' else pred

    return Toy()


def tiny_probe(seed=0, num_classes=4, backbone=TINY_BACKBONE, **kwargs):
    """A ``LinearProbe`` on the frozen tiny backbone, seeded."""
    from classification import LinearProbe
    torch.manual_seed(seed)
    return LinearProbe(backbone=dict(backbone), num_classes=num_classes, **kwargs)


def tool(name, entry='main'):
    """``entry`` (default ``main(argv)``) of tools/<name>.py, run in this process."""
    return runpy.run_path(osp.join(ROOT, 'tools', f'{name}.py'), run_name=f'tools_{name}')[entry]
