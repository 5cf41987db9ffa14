"""Probe heads and recipe against the published InternVL classification code: the published head file loads
strictly (both variants, foreign pickled objects beside the tensors), every loading path refuses a head that does
not fit, the attention-pooling head matches a reference written from its description, and the recipe's numbers
(Mixup/CutMix, label smoothing, SGD Nesterov, timm cosine schedule, EMA) are the published ones."""
import os
import re
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import classification  # noqa: F401  (registers everything)
from classification import LinearProbe, ProbeCheckpointError, read_probe_checkpoint

import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures('one_thread', 'private_hash_cache')  # tests/conftest.py


def tiny_probe(seed=0, num_classes=5, **kwargs):
    return helpers.tiny_probe(seed, num_classes, **kwargs)


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
        from backbones.reading import safe_torch_load
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


@pytest.mark.parametrize('path_taken', ['load_state_dict', 'strict_loader'])
def test_published_head_with_ema_weights_fills_the_ema_head(tmp_path, path_taken):
    """Both ways in give the same model: torch's load_state_dict, and the shared strict loader of load_from /
    tools/test.py (mm_adapter.strict_loading with the converter classification registers)."""
    from mm_adapter.strict_loading import load_checkpoint_strictly, registered_converters

    def load(model, path):
        if path_taken == 'load_state_dict':
            model.load_state_dict(read_probe_checkpoint(str(path)))
        else:
            load_checkpoint_strictly(model, str(path), convert=registered_converters)

    model = tiny_probe(ema_decay=0.998)
    head, ema = random_published_head(128, 5, seed=1), random_published_head(128, 5, seed=2)
    path = tmp_path / 'head.pth'
    save_published_head(path, head, ema)
    load(model, path)
    torch.testing.assert_close(model.ema_heads[0].fc.weight, ema['head.weight'])
    torch.testing.assert_close(model.heads[0].fc.weight, head['head.weight'])
    assert model.ema_available
    model.eval()
    assert model(torch.randn(2, 3, 56, 56)).shape == (2, 2, 5)  # plain and EMA
    save_published_head(path, head)  # no model_ema: only the plain head is evaluated, never a random EMA copy
    load(model, path)
    torch.testing.assert_close(model.ema_heads[0].fc.weight, head['head.weight'])
    assert not model.ema_available and model(torch.randn(2, 3, 56, 56)).shape == (1, 2, 5)
    no_ema = tiny_probe()  # a model without EMA heads reads the plain head of a file with model_ema
    save_published_head(path, head, ema)
    load(no_ema, path)
    torch.testing.assert_close(no_ema.heads[0].fc.weight, head['head.weight'])


MISSING = 'tensors of the model are missing from the checkpoint'
UNEXPECTED = 'tensors of the checkpoint are not in the model'


@pytest.mark.parametrize('change, message', [
    (lambda h: h.pop('norm.running_var'), rf'1 {MISSING}: norm.running_var'),
    (lambda h: h.update({'head.extra': torch.zeros(1)}), rf'1 {UNEXPECTED}: head.extra'),
    (lambda h: h.update({'head.weight': torch.zeros(5, 64)}), r'1 tensors have another shape: head.weight: '
                                                              r'checkpoint \(5, 64\) vs model \(5, 128\)'),
    (lambda h: [h.pop(k) for k in list(h) if k.startswith('norm.')],
     rf'5 {MISSING}: norm.bias, .*norm.weight.*head_norm=False'),
])
def test_a_head_that_does_not_fit_is_refused_on_every_path(tmp_path, change, message):
    from mmengine.runner.checkpoint import load_checkpoint

    from mm_adapter.strict_loading import load_checkpoint_strictly, registered_converters

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
    # load_from and tools/test.py: the shared strict loader with the converter classification registers
    with pytest.raises(ProbeCheckpointError, match=f'{path}: .*{message}'):
        load_checkpoint_strictly(model, str(path), convert=registered_converters)
    torch.testing.assert_close(model.heads[0].fc.weight, before)  # nothing half-loaded


def test_own_checkpoints_are_strict_too(tmp_path):
    model = tiny_probe(ema_decay=0.998)
    state = model.state_dict()
    assert {k.split('.')[0] for k in state} == {'heads', 'ema_heads', 'selected_head', '_extra_state'}
    tiny_probe(ema_decay=0.998).load_state_dict(state)
    for broken, message in (({k: v for k, v in state.items() if k != 'heads.0.fc.bias'},
                             f'1 {MISSING}: heads.0.fc.bias'),
                            (dict(state, **{'heads.1.fc.bias': torch.zeros(5)}), f'1 {UNEXPECTED}: heads.1.fc.bias'),
                            (dict(state, **{'ema_heads.0.fc.bias': torch.zeros(3)}),
                             r'1 tensors have another shape: ema_heads.0.fc.bias: checkpoint \(3,\) vs model \(5,\)')):
        with pytest.raises(ProbeCheckpointError, match=message):
            tiny_probe(ema_decay=0.998).load_state_dict(broken, strict=False)
    with pytest.raises(ProbeCheckpointError, match='no EMA heads: set model.ema_decay=None'):
        tiny_probe(ema_decay=0.998).load_state_dict(tiny_probe().state_dict())


def test_shared_strict_loader_names_the_file_of_heads_from_another_backbone(tmp_path):
    """load_from / tools/test.py with a probe checkpoint: the model's own record check speaks, naming the file."""
    from mm_adapter.strict_loading import load_checkpoint_strictly, registered_converters

    path = tmp_path / 'epoch_1.pth'
    torch.save(dict(state_dict=tiny_probe(seed=0).state_dict(), meta={}), path)
    same = tiny_probe(seed=0)
    load_checkpoint_strictly(same, str(path), convert=registered_converters)
    with pytest.raises(classification.BackboneMismatchError,
                       match=f'^{re.escape(str(path))}: these heads were trained on a backbone with sha256'):
        load_checkpoint_strictly(tiny_probe(seed=1), str(path), convert=registered_converters)


# ------------------------------------------------------------------------------------------------ recipe
def test_schedule_is_timm_cosine_per_iteration_as_the_published_loop_drove_it():
    from timm.scheduler.cosine_lr import CosineLRScheduler

    from classification.schedule import TimmCosineLR

    epochs, per_epoch, lr = 10, 1251, 0.2  # published: batch 1024 (lr 0.1 x 1024 / 512), 1251 iterations / epoch
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ours = TimmCosineLR.build_iter_from_epoch(ours_opt, t_initial=epochs, warmup_t=1, warmup_lr_init=0.0,
                                              lr_min=0.0, by_epoch=True, epoch_length=per_epoch)
    timm_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    timm = CosineLRScheduler(timm_opt, t_initial=epochs * per_epoch, lr_min=0.0, warmup_lr_init=0.0,
                             warmup_t=per_epoch, cycle_limit=1, t_in_epochs=False)
    used_ours, used_timm = [], []
    for g in range(epochs * per_epoch):
        used_ours.append(ours_opt.param_groups[0]['lr'])
        used_timm.append(timm_opt.param_groups[0]['lr'])
        timm.step_update(g)  # the published loop: after each optimizer step, with the global iteration
        ours.step()  # MMEngine's ParamSchedulerHook after each iteration
    np.testing.assert_allclose(used_ours, used_timm, rtol=1e-12, atol=1e-15)
    # Numbers of the published log (lr printed after step_update of that iteration, i.e. the next one's lr):
    assert used_ours[11] == pytest.approx(0.001599, abs=5e-7)  # Train: [0/10][10/1251] lr 0.001599
    assert used_ours[per_epoch + 1] == pytest.approx(0.195106, abs=5e-7)  # Train: [1/10][0/1251] lr 0.195106
    assert used_ours[0] == used_ours[1] == 0.0 and max(used_ours) < lr


def test_schedule_resumed_to_train_longer_continues_the_uninterrupted_curve():
    """A run stopped at its own end (``end`` follows max_epochs) and resumed with more epochs: the config's extent
    applies, and the step the stopped run did not apply (past its end) is applied on load."""
    from classification.schedule import TimmCosineLR

    def scheduler(epochs):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return opt, TimmCosineLR.build_iter_from_epoch(opt, t_initial=4, warmup_t=1, by_epoch=True, epoch_length=3,
                                                       end=epochs)

    def run(opt, sched, steps):
        used = []
        for _ in range(steps):
            used.append(opt.param_groups[0]['lr'])
            opt.step()
            sched.step()
        return used

    straight = run(*scheduler(2), 6)
    first_opt, first = scheduler(1)
    used = run(first_opt, first, 3)
    opt, resumed = scheduler(2)
    opt.load_state_dict(first_opt.state_dict())  # MMEngine's resume: optimizer, then scheduler
    resumed.load_state_dict(first.state_dict())
    used += run(opt, resumed, 3)
    assert resumed.end == 6 and used == straight and straight[3] > 0.0


def recipe_config(name='internvit_6b_224_linear_probe_in1k'):
    from mmengine.config import Config
    return Config.fromfile(os.path.join(REPO, 'configs', 'classification', f'{name}.py'))


def test_default_configs_train_the_published_recipe():
    cfg = recipe_config()
    # Published trainer defaults (config.py), never turned off by its yaml; its log shows them on.
    assert cfg.model.mixup == dict(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0,
                                   switch_prob=0.5, mode='batch')
    assert cfg.model.label_smoothing == 0.1 and cfg.model.ema_decay == 0.998
    assert cfg.optim_wrapper.optimizer == dict(type='SGD', momentum=0.9, nesterov=True, weight_decay=0.0)
    assert cfg.optim_wrapper.clip_grad == dict(max_norm=5.0)  # CLIP_GRAD 5.0
    assert cfg.model.lr == 0.1 and cfg.auto_scale_lr == dict(base_batch_size=512, enable=True)
    assert cfg.train_dataloader.batch_size * 8 == 1024 and cfg.train_dataloader.drop_last is True
    assert cfg.param_scheduler == [dict(type='TimmCosineLR', t_initial=10, warmup_t=1, warmup_lr_init=0.0,
                                        lr_min=0.0, by_epoch=True, convert_to_iter_based=True)]
    assert cfg.train_cfg.max_epochs == 10
    best = cfg.default_hooks.checkpoint
    assert best.save_best == ['top1', 'ema_top1'] and best.rule == 'greater' and best.save_last
    assert cfg.test_dataloader.get('drop_last', False) is False and cfg.val_dataloader.get('drop_last', False) is False


def test_mixup_label_smoothing_and_loss_are_timms():
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    cfg = recipe_config()
    model = tiny_probe(num_classes=10, mixup=cfg.model.mixup, label_smoothing=cfg.model.label_smoothing)
    images, labels = torch.randn(4, 3, 56, 56), torch.tensor([1, 2, 3, 4])
    np.random.seed(3)
    mixed, targets = model.training_targets(images.clone(), labels, 'images')
    reference = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch',
                      label_smoothing=0.1, num_classes=10)
    np.random.seed(3)
    mixed_ref, targets_ref = reference(images.clone(), labels)
    torch.testing.assert_close(mixed, mixed_ref)
    torch.testing.assert_close(targets, targets_ref)
    assert targets.sum(1).allclose(torch.ones(4)) and targets.min() >= 0.1 / 10 - 1e-7  # smoothed
    logits = torch.randn(3, 4, 10)
    from classification.heads import head_losses
    torch.testing.assert_close(head_losses(logits, targets),
                               torch.stack([SoftTargetCrossEntropy()(x, targets) for x in logits]))
    plain = tiny_probe(num_classes=10, label_smoothing=0.1)  # no mixup: smoothed one-hot (timm's targets)
    _, smooth = plain.training_targets(images, labels, 'images')
    assert smooth[0, 1] == pytest.approx(0.9 + 0.01) and smooth[0, 0] == pytest.approx(0.01)
    with pytest.raises(ValueError, match='even batch'):
        model.training_targets(images[:3], labels[:3], 'images')
    with pytest.raises(ValueError, match='cached summaries'):
        model.training_targets(torch.randn(4, 1, 2, 64), labels, 'summaries')


def test_ema_is_timms_model_ema_with_decay_0998():
    from timm.utils import ModelEmaV3

    model = tiny_probe(ema_decay=0.998)
    reference = ModelEmaV3(model.heads, decay=0.998)
    model.train()
    for _ in range(3):
        with torch.no_grad():
            for p in model.heads.parameters():
                p.add_(torch.randn_like(p))
        model.heads[0].norm(torch.randn(8, 128) * 3 + 1)  # moves the BN statistics (buffers are averaged too)
        model.update_ema()
        reference.update(model.heads)
    for (name, ours), theirs in zip(model.ema_heads.state_dict().items(), reference.module.state_dict().values()):
        torch.testing.assert_close(ours, theirs, msg=name)
    assert not any(p.requires_grad for p in model.ema_heads.parameters())


def test_nesterov_sgd_one_group_per_head_and_per_head_clipping():
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

    cfg = recipe_config()
    model = tiny_probe(sweep=True, sweep_lrs=[0.1, 1.0], sweep_features=['cls_mean'])
    wrapper_cfg = {k: v for k, v in cfg.optim_wrapper.items() if k != 'constructor'}
    wrapper = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(type=cfg.optim_wrapper.constructor,
                                                    optim_wrapper_cfg=wrapper_cfg))(model)
    groups = wrapper.optimizer.param_groups
    assert [(g['lr'], g['nesterov'], g['momentum'], g['weight_decay']) for g in groups] == [
        (0.1, True, 0.9, 0.0), (1.0, True, 0.9, 0.0)]
    for p in model.heads[0].parameters():
        p.grad = torch.full_like(p, 10.0)  # far above max_norm 5
    for p in model.heads[1].parameters():
        p.grad = torch.full_like(p, 1e-4)  # far below
    wrapper._clip_grad()
    norms = [torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in h.parameters()])) for h in model.heads]
    assert norms[0] == pytest.approx(5.0, rel=1e-4)  # each head clipped on its own, as if trained alone
    assert norms[1] < 1e-2


# ------------------------------------------------------------------------------------------------ attention pooling
def reference_attention_pooling_logits(tokens, p, num_heads):
    """From the description: query = mean of all tokens (cls included), keys/values = all tokens; separate
    LayerNorms (eps 1e-5) on the q, k, v inputs; q/k/v projections without bias plus separate bias vectors;
    num_heads heads; output projection; then BatchNorm1d (eval, eps 1e-6) and Linear. Published key names."""
    b, t, c = tokens.shape
    d = c // num_heads
    a = 'attn_pooling.'

    def ln(x, name):
        return F.layer_norm(x, (c,), p[a + name + '.weight'], p[a + name + '.bias'], eps=1e-5)

    q = ln(tokens.mean(1, keepdim=True), 'norm1_q') @ p[a + 'cross_attn.q.weight'].T + p[a + 'cross_attn.q_bias']
    k = ln(tokens, 'norm1_k') @ p[a + 'cross_attn.k.weight'].T + p[a + 'cross_attn.k_bias']
    v = ln(tokens, 'norm1_v') @ p[a + 'cross_attn.v.weight'].T + p[a + 'cross_attn.v_bias']
    out = []
    for h in range(num_heads):
        s = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[:, :, s] @ k[:, :, s].transpose(1, 2) / d ** 0.5, dim=-1)  # [B, 1, T]
        out.append(weights @ v[:, :, s])
    pooled = (torch.cat(out, -1) @ p[a + 'cross_attn.proj.weight'].T + p[a + 'cross_attn.proj.bias']).squeeze(1)
    x = F.batch_norm(pooled, p['norm.running_mean'], p['norm.running_var'], p['norm.weight'], p['norm.bias'],
                     training=False, eps=1e-6)
    return F.linear(x, p['head.weight'], p['head.bias'])


def test_attention_pooling_head_matches_the_reference_and_loads_the_published_names(tmp_path):
    model = tiny_probe(feature='attention_pooling', ema_decay=0.998)
    c, heads = 64, 4  # internvit_tiny: width 64, 4 heads (6B: 3200, 25 heads of 128)
    g = torch.Generator().manual_seed(5)
    p = random_published_head(c, 5, seed=6)
    for n in ('norm1_q', 'norm1_k', 'norm1_v'):
        p[f'attn_pooling.{n}.weight'] = torch.rand(c, generator=g) + 0.5
        p[f'attn_pooling.{n}.bias'] = torch.randn(c, generator=g) * 0.1
    for n in ('q', 'k', 'v'):
        p[f'attn_pooling.cross_attn.{n}.weight'] = torch.randn(c, c, generator=g) * c ** -0.5
        p[f'attn_pooling.cross_attn.{n}_bias'] = torch.randn(c, generator=g) * 0.1
    p['attn_pooling.cross_attn.proj.weight'] = torch.randn(c, c, generator=g) * c ** -0.5
    p['attn_pooling.cross_attn.proj.bias'] = torch.randn(c, generator=g) * 0.1
    path = tmp_path / 'attn_head.pth'
    save_published_head(path, p, ema=p)
    model.load_state_dict(read_probe_checkpoint(str(path)))
    model.eval()
    images = torch.randn(3, 3, 56, 56)
    tokens = model.backbone.forward_features(images).float()
    expected = reference_attention_pooling_logits(tokens, p, heads)
    logits = model(images)
    torch.testing.assert_close(logits[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], expected, rtol=1e-5, atol=1e-5)  # EMA copy = model_ema
    assert model.heads[0].pool.q.bias is None and model.heads[0].pool.proj.weight.shape == (c, c)


def test_attention_pooling_trains_beside_linear_heads_from_one_backbone_pass():
    model = tiny_probe(sweep=True, sweep_lrs=[0.1], sweep_features=['cls_mean', 'attention_pooling'])
    calls = []
    model.backbone.register_forward_hook(lambda *a: calls.append(1))
    losses = model(torch.randn(4, 3, 56, 56), dict(labels=torch.tensor([0, 1, 2, 3])), mode='loss')
    losses['loss'].backward()
    assert model.backbone_images_processed == 4
    assert model.heads[1].pool.q.weight.grad is not None and model.heads[0].fc.weight.grad is not None
    with pytest.raises(ValueError, match='token sequence'):
        model.head_logits(torch.randn(4, 1, 2, 64))  # summaries only (the feature cache): refused


def test_configs_for_both_probe_types_and_every_published_backbone():
    from mmengine.registry import MODELS

    published = {  # config stem: (preset, img_size, depth, pretrained)
        'internvit_6b_224': ('internvit_6b_224', 224, 48, 'InternViT-6B-224px'),
        'internvit_6b_224to448': ('internvit_6b_224', 448, 48, 'InternViT-6B-224px'),
        'internvit_6b_448_v1_0': ('internvit_6b_448', 448, 45, 'InternViT-6B-448px-V1-0'),
        'internvit_6b_448_v1_2': ('internvit_6b_448', 448, 45, 'InternViT-6B-448px-V1-2'),
        'internvit_6b_448': ('internvit_6b_448', 448, 45, 'InternViT-6B-448px-V1-5'),
        'internvit_6b_448_v2_5': ('internvit_6b_448', 448, 45, 'InternViT-6B-448px-V2_5'),
        'internvit_300m_448': ('internvit_300m_448', 448, 24, 'InternViT-300M-448px'),
    }
    for stem, (preset, size, depth, weights) in published.items():
        for kind, feature in (('linear_probe', 'cls_mean'), ('attn_pool_probe', 'attention_pooling')):
            cfg = recipe_config(f'{stem}_{kind}_in1k')
            assert cfg.model.feature == feature and cfg.model.backbone.pretrained == f'pretrained/{weights}'
            assert cfg.test_cfg.pipeline.size == size and cfg.train_dataloader.dataset.dataset.pipeline.size == size
            assert cfg.model.ema_decay == 0.998 and cfg.model.mixup.mixup_alpha == 0.8
            with torch.device('meta'):
                model = MODELS.build(dict(cfg.model, backbone=dict(cfg.model.backbone, pretrained=None)))
            assert model.backbone.depth == depth and model.backbone.arch.img_size == size, stem
            if feature == 'attention_pooling':
                pool = model.heads[0].pool
                assert pool.num_heads == model.backbone.arch.num_heads and pool.norm_q.eps == 1e-5
                assert model.heads[0].fc.in_features == model.backbone.embed_dim
    assert recipe_config('internvit_6b_224_attn_pool_probe_in1k').test_cfg.reference == {'IN-1K': 89.2}


# ------------------------------------------------------------------------------------------------ evaluation sets
def write_image(path, value=0, size=20):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (size, size), (value, value, value)).save(path)


def timm_list(name):
    import timm
    with open(os.path.join(os.path.dirname(timm.__file__), 'data', '_info', name)) as f:
        return [line.strip() for line in f if line.strip()]


@pytest.mark.parametrize('subset, indices_file', [('imagenet_a', 'imagenet_a_indices.txt'),
                                                  ('imagenet_r', 'imagenet_r_indices.txt')])
def test_a_and_r_masks_are_timms_published_lists_and_folders_must_match(tmp_path, subset, indices_file):
    from classification import DatasetLayoutError, ImageNetFolder

    synsets = timm_list('imagenet_synsets.txt')
    indices = [int(v) for v in timm_list(indices_file)]
    assert len(synsets) == 1000 and len(indices) == 200
    root = tmp_path / subset
    for i in indices:
        write_image(root / synsets[i] / 'x.png')
    eval_56 = dict(type='ProbeEvalTransform', size=56)
    dataset = ImageNetFolder(str(root), eval_56, classes=synsets, class_subset=subset, name='A')
    assert dataset.class_subset == sorted(indices) and len(dataset) == 200
    assert dataset.labels.tolist() == sorted(indices)  # labels index the 1000-way logits
    import shutil
    shutil.rmtree(root / synsets[indices[7]])
    with pytest.raises(DatasetLayoutError, match=f'class folder {root / synsets[indices[7]]} is missing'):
        ImageNetFolder(str(root), eval_56, classes=synsets, class_subset=subset, name='A')
    write_image(root / synsets[indices[7]] / 'x.png')
    other = next(i for i in range(1000) if i not in indices)
    write_image(root / synsets[other] / 'x.png')
    with pytest.raises(DatasetLayoutError, match=f'folder {root / synsets[other]} is not one of the 200 classes'):
        ImageNetFolder(str(root), eval_56, classes=synsets, class_subset=subset, name='A')


def test_a_missing_set_does_not_stop_the_others_and_fails_at_the_end(tmp_path):
    from classification import MissingEvaluationSetError, MultiSetTestLoop

    for c in ('n01', 'n02'):
        write_image(tmp_path / 'val' / c / f'{c}.png', 40)
    eval_56 = dict(type='ProbeEvalTransform', size=56)
    sets = [dict(name='IN-1K', dataset=dict(type='ImageNetFolder', root=str(tmp_path / 'val'), pipeline=eval_56)),
            dict(name='V2', dataset=dict(type='ImageNetV2Folder', root=str(tmp_path / 'nowhere'),
                                         classes=['n01', 'n02'], pipeline=eval_56)),
            dict(name='Sketch', dataset=dict(type='ImageNetFolder', root=str(tmp_path / 'val'), name='Sketch',
                                             pipeline=eval_56))]
    evaluated = []

    class Runner:  # the parts of MMEngine's runner the loop uses
        model = tiny_probe(num_classes=2)
        seed = 0

        def call_hook(self, *args, **kwargs):
            pass

        def build_dataloader(self, cfg, seed=None):
            from mmengine.registry import DATASETS
            dataset = DATASETS.build(cfg['dataset'])
            evaluated.append(dataset.name)
            return torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=classification.probe_collate)

        def build_evaluator(self, cfg):
            from mmengine.evaluator import Evaluator
            return Evaluator(cfg)

    loop = MultiSetTestLoop(Runner(), {}, dict(type='ImageNetAccuracy'), sets=sets)
    missing = rf"(?s)V2: .*{tmp_path / 'nowhere'} does not exist.*test_cfg.skip"
    with pytest.raises(MissingEvaluationSetError, match=missing):
        loop.run()
    assert evaluated == ['IN-1K', 'Sketch']  # the set after the missing one was still evaluated
    metrics = MultiSetTestLoop(Runner(), {}, dict(type='ImageNetAccuracy'), sets=sets, skip=['V2']).run()
    assert set(metrics) >= {'IN-1K/top1', 'Sketch/top1'} and not any(k.startswith('V2') for k in metrics)


# ------------------------------------------------------------------------------------------------ feature cache
def test_feature_cache_integrity(tmp_path):
    from classification import CachedFeatures, StaleFeatureCacheError

    root = tmp_path / 'train'
    for c in ('n01', 'n02'):
        for k in range(3):
            write_image(root / c / f'{k}.png', 30 * k)
    source = dict(type='ImageNetFolder', root=str(root), pipeline=dict(type='ProbeEvalTransform', size=56))
    cache_dir = tmp_path / 'cache'
    settings = dict(cache_dir=str(cache_dir), shard_size=4, extract_batch_size=4, extract_num_workers=0)
    model = tiny_probe()
    assert CachedFeatures(source, **settings).prepare(model) == 6
    # the same file names with other contents: stale (sizes / modification times are in the fingerprint)
    stat = os.stat(root / 'n01' / '0.png')
    write_image(root / 'n01' / '0.png', 200, size=24)
    with pytest.raises(StaleFeatureCacheError, match='dataset.file_list_sha256'):
        CachedFeatures(source, **settings).prepare(model)
    write_image(root / 'n01' / '0.png', 0)
    os.utime(root / 'n01' / '0.png', ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cache = CachedFeatures(source, **settings)
    assert cache.prepare(model) == 0  # the original file back: the cache is valid again
    # a shard cut short (a full disk, a copy interrupted): an error naming it, never garbage features
    shard = cache_dir / 'shard_00001.npy'
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(StaleFeatureCacheError, match=f'{shard} is truncated or altered'):
        CachedFeatures(source, **settings)[5]
    assert CachedFeatures(source, **settings)[0]['inputs'].shape == (1, 2, 64)  # the intact shard still reads
    # shards without their manifest: never adopted under a new manifest
    (cache_dir / 'manifest.json').unlink()
    with pytest.raises(StaleFeatureCacheError, match='holds shards .* but no manifest.json'):
        CachedFeatures(source, **settings).prepare(model)
    assert not (cache_dir / 'manifest.json').exists()


# ------------------------------------------------------------------------------------------------ precision
def test_fp16_autocast_with_fp32_weights_beside_pure_bf16():
    """The published probe ran the backbone under fp16 autocast with fp32 weights; the configs default to pure bf16.
    Measured here (tiny InternViT, CPU): relative L2 difference of the summaries from fp32, fp16 autocast 4.3e-4,
    bf16 5.6e-3 (README)."""
    torch.manual_seed(0)
    reference = tiny_probe()
    weights = reference.backbone.state_dict()
    images = torch.randn(8, 3, 56, 56)
    fp32 = reference.summaries(images)
    autocast = tiny_probe(autocast='float16')
    autocast.backbone.load_state_dict(weights)
    bf16 = LinearProbe(backbone=dict(type='InternViT', preset='internvit_tiny', frozen=True, dtype='bfloat16'),
                       num_classes=5)
    bf16.backbone.load_state_dict(weights)
    seen = []
    handle = autocast.backbone.encoder.layers[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    fp16_features = autocast.summaries(images)
    handle.remove()
    assert seen == [torch.float16] and autocast.backbone.embeddings.patch_embedding.weight.dtype == torch.float32
    assert fp16_features.dtype == torch.float32  # heads run in fp32 either way

    def rel(x):
        return float((x - fp32).norm() / fp32.norm())

    assert rel(fp16_features) < 2e-3 and 1e-3 < rel(bf16.summaries(images)) < 3e-2
    assert rel(fp16_features) < rel(bf16.summaries(images))
    with pytest.raises(ValueError, match='autocast must be one of'):
        tiny_probe(autocast='int8')


def test_the_published_head_is_one_cell_of_the_sweep():
    """model.sweep=True on the published config trains the published head (cls_mean, lr 0.1, same mixup, clipping,
    schedule and EMA) exactly as the single-head run does, beside the other heads."""
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

    cfg = recipe_config()
    cfg.merge_from_dict({'model.sweep': True})
    grid = classification.model.head_grid(cfg.model.feature, cfg.model.lr, True,
                                          cfg.model.get('sweep_lrs', classification.DEFAULT_SWEEP_LRS),
                                          cfg.model.get('sweep_features', classification.DEFAULT_SWEEP_FEATURES))
    assert (classification.FeatureSpec.parse('cls_mean'), 0.1) in grid  # the published cell is in the default grid
    recipe = dict(mixup=cfg.model.mixup, label_smoothing=cfg.model.label_smoothing, ema_decay=cfg.model.ema_decay)
    single = tiny_probe(**recipe)
    sweep = tiny_probe(**recipe, sweep=True, sweep_lrs=[0.1, 5.0], sweep_features=['cls', 'cls_mean'])
    cell = sweep.head_names.index('cls_mean_lr0.1')
    sweep.heads[cell].load_state_dict(single.heads[0].state_dict())
    sweep.ema_heads[cell].load_state_dict(single.ema_heads[0].state_dict())
    wrapper_cfg = {k: v for k, v in cfg.optim_wrapper.items() if k != 'constructor'}
    wrappers = [OPTIM_WRAPPER_CONSTRUCTORS.build(dict(type=cfg.optim_wrapper.constructor,
                                                      optim_wrapper_cfg=wrapper_cfg))(m) for m in (single, sweep)]
    images = torch.randn(4, 4, 3, 56, 56) * 3
    labels = torch.tensor([[0, 1, 2, 3], [4, 0, 1, 2], [3, 4, 0, 1], [2, 3, 4, 0]])
    for model, wrapper in zip((single, sweep), wrappers):
        model.train()
        np.random.seed(0)  # the same mixup draws for both runs
        for x, y in zip(images, labels):
            wrapper.update_params(model(x.clone(), dict(labels=y), mode='loss')['loss'] * 100)  # large: clipping acts
            model.update_ema()
    for name, value in single.heads[0].state_dict().items():
        torch.testing.assert_close(sweep.heads[cell].state_dict()[name], value, msg=name)
    for name, value in single.ema_heads[0].state_dict().items():
        torch.testing.assert_close(sweep.ema_heads[cell].state_dict()[name], value, msg=name)
    assert not torch.equal(single.heads[0].fc.weight, tiny_probe(**recipe).heads[0].fc.weight)  # it trained


def test_probe_batchnorm_with_gradient_uses_global_statistics(monkeypatch):
    """Under DDP, BN after the attention pooling (input with grad) takes its statistics over all ranks through a
    differentiable all-reduce. Two ranks holding the same batch must give single-process BatchNorm exactly."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    from classification import ProbeBatchNorm

    monkeypatch.setattr(dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(dist, 'get_world_size', lambda *a: 2)
    monkeypatch.setattr(dist_fn, 'all_reduce', lambda t, *a, **k: t * 2)  # the other rank holds the same batch
    x = torch.randn(6, 8) * 3 + 1
    ours, plain = ProbeBatchNorm(8, eps=1e-6), torch.nn.BatchNorm1d(8, eps=1e-6)
    with torch.no_grad():
        for bn in (ours, plain):
            bn.weight.copy_(torch.linspace(0.5, 2, 8))
            bn.bias.copy_(torch.linspace(-1, 1, 8))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_plain = ours(xa), plain(xb)
    torch.testing.assert_close(out_ours, out_plain, rtol=1e-5, atol=1e-5)
    (out_ours * torch.arange(8.0)).sum().backward()
    (out_plain * torch.arange(8.0)).sum().backward()
    # The all-reduce's backward brings the other rank's loss through the shared statistics: with identical
    # batches the input gradient is single-process BatchNorm's.
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    biased = x.var(0, unbiased=False)  # running variance: unbiased over the global batch of 12
    torch.testing.assert_close(ours.running_var, 0.9 + 0.1 * biased * 12 / 11, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_mean, plain.running_mean, rtol=1e-5, atol=1e-6)
