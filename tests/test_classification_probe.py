"""Probe heads and recipe against the published InternVL classification code: the published head file loads
strictly (both variants, foreign pickled objects beside the tensors), every loading path refuses a head that does
not fit, the attention-pooling head matches a reference written from its description, and the recipe's numbers
(Mixup/CutMix, label smoothing, SGD Nesterov, timm cosine schedule, EMA) are the published ones."""
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import classification  # noqa: F401  (registers everything)
from classification import LinearProbe, ProbeCheckpointError, read_probe_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread_and_private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('INTERNVIT_CACHE_DIR', str(tmp_path / 'hash_cache'))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_probe(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault('num_classes', 5)
    return LinearProbe(backbone=dict(type='InternViT', preset='internvit_tiny', frozen=True), **kwargs)


def save_published_head(path, head: dict, ema: dict | None = None):
    """A head file as the published trainer writes it: 'model' beside its optimizer, a yacs config, numbers."""
    yacs, config = types.ModuleType('yacs'), types.ModuleType('yacs.config')

    class CfgNode(dict):  # what yacs' CfgNode is: a dict subclass with attributes
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.__dict__['_immutable'] = True

    CfgNode.__module__ = 'yacs.config'
    CfgNode.__qualname__ = 'CfgNode'
    config.CfgNode, yacs.config = CfgNode, config
    sys.modules.update({'yacs': yacs, 'yacs.config': config})
    try:
        cfg = CfgNode(TRAIN=CfgNode(BASE_LR=0.2, EMA=CfgNode(ENABLE=True, DECAY=0.998)), MODEL=CfgNode(TYPE='x'))
        obj = dict(model=head, optimizer=dict(state={}, param_groups=[dict(lr=0.0, momentum=0.9, params=[0, 1])]),
                   lr_scheduler=dict(t_initial=12510), max_accuracy=np.float64(88.23), epoch=9, config=cfg)
        if ema is not None:
            obj['model_ema'] = ema
        torch.save(obj, path)
    finally:
        del sys.modules['yacs'], sys.modules['yacs.config']


def random_published_head(dim, classes, norm=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    head = {'head.weight': torch.randn(classes, dim, generator=g) * 0.1, 'head.bias': torch.randn(classes, generator=g)}
    if norm:
        head.update({'norm.weight': torch.rand(dim, generator=g) + 0.5, 'norm.bias': torch.randn(dim, generator=g),
                     'norm.running_mean': torch.randn(dim, generator=g),
                     'norm.running_var': torch.rand(dim, generator=g) + 0.5,
                     'norm.num_batches_tracked': torch.tensor(12510)})
    return head


def reference_logits(model, images, head):
    """Independent of the probe code: concat(cls, mean of patches) -> BatchNorm1d (eval, eps 1e-6) -> Linear."""
    tokens = model.backbone.forward_features(images).float()
    x = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)
    if 'norm.weight' in head:
        x = F.batch_norm(x, head['norm.running_mean'], head['norm.running_var'], head['norm.weight'],
                         head['norm.bias'], training=False, eps=1e-6)
    return F.linear(x, head['head.weight'], head['head.bias'])


# ------------------------------------------------------------------------------------------------ published head
@pytest.mark.parametrize('norm', [True, False], ids=['bn_linear', 'older_linear_only'])
def test_published_head_file_loads_strictly_and_gives_the_reference_logits(tmp_path, norm):
    model = tiny_probe(head_norm=norm)
    head = random_published_head(128, 5, norm=norm)
    path = tmp_path / 'intern_vit_6b_224px_head.pth'
    save_published_head(path, head)
    with pytest.raises(Exception, match='refused to load'):  # the project's default reader refuses yacs
        from backbones.weights import safe_torch_load
        safe_torch_load(path)
    checkpoint = read_probe_checkpoint(str(path))
    assert checkpoint['epoch'] == 9 and checkpoint['config']['TRAIN']['BASE_LR'] == 0.2  # inert, plain data
    model.load_state_dict(checkpoint)
    model.eval()
    images = torch.randn(6, 3, 56, 56)
    expected = reference_logits(model, images, head)
    torch.testing.assert_close(model(images)[0], expected, rtol=1e-5, atol=1e-5)
    # and the accuracy the metric reports is the one recomputed from those logits
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    samples = model(images, dict(labels=labels, indices=torch.arange(6), real_labels=None), mode='predict')
    metric = classification.ImageNetAccuracy(topk=(1, 5))
    metric.dataset_meta = {}
    metric.process(None, samples)
    result = metric.compute_metrics(metric.results)
    assert result['top1'] == pytest.approx(100.0 * (expected.argmax(1) == labels).float().mean().item())


def test_published_head_with_ema_weights_fills_the_ema_head(tmp_path):
    model = tiny_probe(ema_decay=0.998)
    head, ema = random_published_head(128, 5, seed=1), random_published_head(128, 5, seed=2)
    path = tmp_path / 'head.pth'
    save_published_head(path, head, ema)
    model.load_state_dict(read_probe_checkpoint(str(path)))
    torch.testing.assert_close(model.ema_heads[0].fc.weight, ema['head.weight'])
    torch.testing.assert_close(model.heads[0].fc.weight, head['head.weight'])
    model.eval()
    assert model(torch.randn(2, 3, 56, 56)).shape == (2, 2, 5)  # plain and EMA
    save_published_head(path, head)  # no model_ema: only the plain head is evaluated, never a random EMA copy
    model.load_state_dict(read_probe_checkpoint(str(path)))
    assert not model.ema_available and model(torch.randn(2, 3, 56, 56)).shape == (1, 2, 5)


@pytest.mark.parametrize('change, message', [
    (lambda h: h.pop('norm.running_var'), r'missing 1: norm.running_var'),
    (lambda h: h.update({'head.extra': torch.zeros(1)}), r'unexpected 1: head.extra'),
    (lambda h: h.update({'head.weight': torch.zeros(5, 64)}), r'wrong shape 1: head.weight: file \(5, 64\), model '
                                                              r'\(5, 128\)'),
    (lambda h: [h.pop(k) for k in list(h) if k.startswith('norm.')], r'missing 5: norm.weight.*head_norm=False'),
])
def test_a_head_that_does_not_fit_is_refused_on_every_path(tmp_path, change, message):
    from mmengine.runner.checkpoint import load_checkpoint

    head = random_published_head(128, 5)
    change(head)
    path = tmp_path / 'bad_head.pth'
    save_published_head(path, head)
    model = tiny_probe()
    before = model.heads[0].fc.weight.clone()
    checkpoint = read_probe_checkpoint(str(path))
    with pytest.raises(ProbeCheckpointError, match=message):
        model.load_state_dict(checkpoint)
    with pytest.raises(ProbeCheckpointError, match=message):
        model.load_state_dict(checkpoint, strict=False)  # strict regardless of the flag
    plain = tmp_path / 'bad_head_plain.pth'  # MMEngine's own loader reads only plain files (weights_only)
    torch.save(dict(model=head), plain)
    with pytest.raises(ProbeCheckpointError, match=message):
        load_checkpoint(model, str(plain), strict=False)
    runner = types.SimpleNamespace(model=model, _resuming=False, call_hook=lambda *a, **k: None, logger=None)
    with pytest.raises(ProbeCheckpointError, match=f'{path}: .*{message}'):  # load_from, tools/test.py, resume
        classification.ProbeRunner.load_checkpoint(runner, str(path))
    torch.testing.assert_close(model.heads[0].fc.weight, before)  # nothing half-loaded


def test_own_checkpoints_are_strict_too(tmp_path):
    model = tiny_probe(ema_decay=0.998)
    state = model.state_dict()
    assert {k.split('.')[0] for k in state} == {'heads', 'ema_heads', 'selected_head', '_extra_state'}
    tiny_probe(ema_decay=0.998).load_state_dict(state)
    for broken, message in (({k: v for k, v in state.items() if k != 'heads.0.fc.bias'}, 'missing 1: heads.0.fc.bias'),
                            (dict(state, **{'heads.1.fc.bias': torch.zeros(5)}), 'unexpected 1: heads.1.fc.bias'),
                            (dict(state, **{'ema_heads.0.fc.bias': torch.zeros(3)}),
                             r'wrong shape 1: ema_heads.0.fc.bias: file \(3,\), model \(5,\)')):
        with pytest.raises(ProbeCheckpointError, match=message):
            tiny_probe(ema_decay=0.998).load_state_dict(broken, strict=False)
    with pytest.raises(ProbeCheckpointError, match='no EMA heads: set model.ema_decay=None'):
        tiny_probe(ema_decay=0.998).load_state_dict(tiny_probe().state_dict())
