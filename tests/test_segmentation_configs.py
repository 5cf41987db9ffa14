"""Every segmentation config parses, respects the patch size, and (6B/300M) builds on the meta device as published."""
import glob
import os.path as osp
from dataclasses import replace

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS

import segmentation  # noqa: F401
from backbones import PRESETS
from backbones.internvit import Block
from segmentation.layer_decay import InternViTLayerDecayOptimizerConstructor

CONFIG_DIR = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs', 'segmentation')
ALL_CONFIGS = sorted(glob.glob(osp.join(CONFIG_DIR, '*.py')))
PUBLISHED_PARAMS = {'internvit_6b_224': 5_902_793_600, 'internvit_300m_448': 304_012_288}

# name -> (preset, out_indices, frozen, drop_path, layer decay, weight decay, runner)
EXPECTED = {
    'internvit_6b_linear_frozen_ade20k_504_80k': ('internvit_6b_224', [44], True, 0.0, 1.0, 0.0, 'Runner'),
    'internvit_6b_upernet_frozen_ade20k_504_80k': ('internvit_6b_224', [11, 23, 35, 47], True, 0.0, 1.0, 0.05,
                                                   'Runner'),
    'internvit_6b_upernet_full_ade20k_504_80k_fsdp': ('internvit_6b_224', [11, 23, 35, 47], False, 0.4, 0.95, 0.05,
                                                      'InternViTFSDPStrategy'),
    'internvit_6b_upernet_full_ade20k_504_80k_deepspeed': ('internvit_6b_224', [11, 23, 35, 47], False, 0.4, 0.95,
                                                           0.05, 'InternViTDeepSpeedStrategy'),
    'internvit_300m_linear_frozen_ade20k_504_80k': ('internvit_300m_448', [23], True, 0.0, 1.0, 0.0, 'Runner'),
    'internvit_300m_upernet_frozen_ade20k_504_80k': ('internvit_300m_448', [5, 11, 17, 23], True, 0.0, 1.0, 0.05,
                                                     'Runner'),
    'internvit_300m_upernet_full_ade20k_504_80k': ('internvit_300m_448', [5, 11, 17, 23], False, 0.2, 0.9, 0.05,
                                                   'Runner'),
}
FEW_SHOT = {16: 5000, 8: 10000, 4: 20000, 2: 40000, 1: 80000}
for _n, _iters in FEW_SHOT.items():
    EXPECTED[f'internvit_6b_linear_fewshot_1of{_n}_ade20k_504_{_iters // 1000}k_fsdp'] = (
        'internvit_6b_224', [47], False, 0.4, 0.95, 0.05, 'InternViTFSDPStrategy')


def name_of(path):
    return osp.splitext(osp.basename(path))[0]


def test_every_published_setting_has_a_config():
    names = {name_of(p) for p in ALL_CONFIGS}
    assert set(EXPECTED) <= names, sorted(set(EXPECTED) - names)


@pytest.mark.parametrize('path', ALL_CONFIGS, ids=name_of)
def test_config_respects_patch_size_and_recipe(path):
    cfg = Config.fromfile(path)
    assert cfg.custom_imports == dict(imports=['mm_adapter', 'segmentation'], allow_failed_imports=False)
    pre = cfg.model.data_preprocessor
    assert all(s % 14 == 0 for s in pre.size), pre.size
    assert pre.test_cfg == dict(size_divisor=14)
    crops = [t['crop_size'] for t in cfg.train_dataloader.dataset.pipeline if t['type'] == 'RandomCrop']
    assert crops and all(s % 14 == 0 for s in crops[0]) and tuple(crops[0]) == tuple(pre.size)
    test_cfg = cfg.model.test_cfg
    if test_cfg.mode == 'slide':
        assert all(s % 14 == 0 for s in (*test_cfg.crop_size, *test_cfg.stride))
    if name_of(path) in EXPECTED:  # the published ADE20K recipe
        assert tuple(pre.size) == (504, 504) and tuple(test_cfg.crop_size) == (504, 504)
        assert tuple(test_cfg.stride) == (322, 322)
        assert cfg.train_dataloader.batch_size == 2
        assert cfg.optim_wrapper.optimizer.type == 'AdamW' and cfg.optim_wrapper.optimizer.lr == 4e-5
        (schedule,) = cfg.param_scheduler
        assert schedule.type == 'PolyLRWithLinearWarmup' and schedule.end == cfg.train_cfg.max_iters
        assert cfg.model.backbone.dtype in ('bfloat16', None)


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_backbone_builds_on_meta_as_published(name):
    preset, out_indices, frozen, drop_path, layer_decay, weight_decay, runner = EXPECTED[name]
    cfg = Config.fromfile(osp.join(CONFIG_DIR, name + '.py'))
    with DefaultScope.overwrite_default_scope('mmseg'), torch.device('meta'):
        model = MODELS.build(cfg.model)
    backbone = model.backbone
    assert backbone.arch == replace(PRESETS[preset], img_size=504)  # position grid trained and stored at 36x36
    grid_growth = (36 * 36 - PRESETS[preset].grid_size ** 2) * PRESETS[preset].embed_dim
    assert sum(p.numel() for p in backbone.parameters()) == PUBLISHED_PARAMS[preset] + grid_growth
    assert backbone.out_indices == out_indices
    assert backbone.frozen is frozen
    assert all(p.requires_grad is not frozen for p in backbone.parameters())
    assert backbone.layers[-1].drop_path.drop_prob == pytest.approx(drop_path)
    assert backbone.grad_checkpointing is (name.startswith('internvit_6b') and not frozen)
    assert cfg.optim_wrapper.paramwise_cfg.layer_decay_rate == layer_decay
    assert cfg.optim_wrapper.optimizer.weight_decay == weight_decay
    if runner == 'Runner':
        assert 'runner_type' not in cfg
    else:
        assert cfg.runner_type == 'FlexibleRunner' and cfg.strategy.type == runner
    if runner == 'InternViTFSDPStrategy':
        assert cfg.strategy.model_wrapper.type == 'InternViTBlockFSDP'
        assert cfg.strategy.model_wrapper.block_param_dtype == 'bfloat16'
        assert sum(isinstance(m, Block) for m in model.modules()) == PRESETS[preset].depth  # FSDP units
    if runner == 'InternViTDeepSpeedStrategy':
        assert cfg.strategy.zero_optimization.stage == 3 and cfg.strategy.bf16.enabled
        # regular checkpoints are DeepSpeed folders; the hook writes an exportable plain file at the end, which
        # MMEngine's DeepSpeedStrategy can only do with ZeRO-3's 16-bit gathering on save
        assert cfg.strategy.zero_optimization.stage3_gather_16bit_weights_on_model_save
        assert [h.type for h in cfg.custom_hooks] == ['FinalWeightsHook']
    if 'fewshot' in name:
        n = int(name.split('1of')[1].split('_')[0])
        assert cfg.train_dataloader.dataset.fraction == pytest.approx(1 / n)
        assert cfg.train_cfg.max_iters == FEW_SHOT[n]
        assert type(model.decode_head).__name__ == 'LinearBNHead'
    if not frozen:  # the layer-decay groups of the real model (built on meta: no memory)
        optimizer_cfg = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=4e-5, weight_decay=weight_decay))
        groups = InternViTLayerDecayOptimizerConstructor(optimizer_cfg, dict(cfg.optim_wrapper.paramwise_cfg))(
            model).optimizer.param_groups
        depth = PRESETS[preset].depth
        assert {g['layer_id'] for g in groups} == set(range(depth + 2))
        embed = [g for g in groups if g['layer_id'] == 0]
        assert min(g['lr'] for g in embed) == pytest.approx(4e-5 * layer_decay ** (depth + 1))


# --------------------------------------------------------------------------- the published configs, value by value
# From InternVL's segmentation/configs/intern_vit_6b/** (mmseg 0.x), written out here, not read from our configs:
# name -> (published config, warm-up iterations, iterations, aux head (channels, in_index) or None, test resize)
SHORT_504, FIT_2016 = 'short side 504 (SETR_Resize)', 'fit 2016x504 (Resize keep_ratio)'
PUBLISHED = {
    'internvit_6b_linear_frozen_ade20k_504_80k': (
        'linear_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5_frozen', 1500, 80000, None, SHORT_504),
    'internvit_6b_upernet_frozen_ade20k_504_80k': (
        'upernet_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5_frozen', 1500, 80000, (1536, 1), SHORT_504),
    'internvit_6b_upernet_full_ade20k_504_80k_fsdp': (
        'upernet_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5', 1500, 80000, (1536, 2), SHORT_504),
    'internvit_6b_upernet_full_ade20k_504_80k_deepspeed': (
        'upernet_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5', 1500, 80000, (1536, 2), SHORT_504),
    'internvit_6b_linear_fewshot_1of16_ade20k_504_5k_fsdp': (
        'linear_intern_vit_6b_504_5k_ade20k_bs16_lr4e-5_1of16', 100, 5000, None, FIT_2016),
    'internvit_6b_linear_fewshot_1of8_ade20k_504_10k_fsdp': (
        'linear_intern_vit_6b_504_10k_ade20k_bs16_lr4e-5_1of8', 200, 10000, None, FIT_2016),
    'internvit_6b_linear_fewshot_1of4_ade20k_504_20k_fsdp': (
        'linear_intern_vit_6b_504_20k_ade20k_bs16_lr4e-5_1of4', 400, 20000, None, FIT_2016),
    'internvit_6b_linear_fewshot_1of2_ade20k_504_40k_fsdp': (
        'linear_intern_vit_6b_504_40k_ade20k_bs16_lr4e-5_1of2', 800, 40000, None, FIT_2016),
    'internvit_6b_linear_fewshot_1of1_ade20k_504_80k_fsdp': (
        'linear_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5_1of1', 1500, 80000, None, SHORT_504),
}
TEST_RESIZE = {SHORT_504: [dict(type='ResizeShortSide', size=504), dict(type='ResizeToMultiple', size_divisor=14)],
               FIT_2016: [dict(type='Resize', scale=(2016, 504), keep_ratio=True),
                          dict(type='ResizeToMultiple', size_divisor=14)]}


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_config_holds_the_published_values(name):
    _, warmup, iters, aux, test_resize = PUBLISHED[name]
    cfg = Config.fromfile(osp.join(CONFIG_DIR, name + '.py'))
    (schedule,) = cfg.param_scheduler  # mmcv poly from iteration 0, linear warm-up factor on top
    assert (schedule.type, schedule.power, schedule.eta_min, schedule.warmup_ratio, schedule.warmup_iters,
            schedule.begin, schedule.end) == ('PolyLRWithLinearWarmup', 1.0, 0.0, 1e-6, warmup, 0, iters)
    assert cfg.train_cfg.max_iters == iters and cfg.train_cfg.val_interval == 1000
    checkpoint = cfg.default_hooks.checkpoint
    assert (checkpoint.interval, checkpoint.max_keep_ckpts, checkpoint.save_best, checkpoint.rule) == \
        (1000, 2, 'mIoU', 'greater')  # the published evaluation(save_best='auto'), every config (DeepSpeed too)
    resize = [t for t in cfg.train_dataloader.dataset.pipeline if t['type'] == 'RandomResize']
    assert resize == [dict(type='RandomResize', scale=(2016, 504), ratio_range=(0.5, 2.0), keep_ratio=True)]
    for loader in (cfg.val_dataloader, cfg.test_dataloader):
        steps = [t for t in loader.dataset.pipeline if 'Resize' in t['type']]
        assert steps == TEST_RESIZE[test_resize]
    assert cfg.optim_wrapper.paramwise_cfg.get('embeddings_weight_decay', True)  # published: pos/cls decayed
    assert cfg.model.backbone.img_size == 504
    with DefaultScope.overwrite_default_scope('mmseg'), torch.device('meta'):
        model = MODELS.build(cfg.model)
    assert model.backbone.embeddings.position_embedding.shape == (1, 1 + 36 * 36, 3200)
    if aux is None:  # linear: BN named decode_head.norm, then the 1x1 conv
        assert {'decode_head.norm.running_mean', 'decode_head.conv_seg.weight'} <= set(model.state_dict())
        assert model.decode_head.norm.num_features == 3200
    else:
        assert model.decode_head.channels == 1536
        assert (model.auxiliary_head.channels, model.auxiliary_head.in_index) == aux
        assert model.auxiliary_head.loss_decode.loss_weight == 0.4
        x4 = model.neck.branches[0]
        assert [type(m).__name__ for m in x4] == ['ConvTranspose2d', 'LayerNorm2d', 'GELU', 'ConvTranspose2d']
        assert x4[1].eps == 1e-6


def test_schedule_is_mmcv_poly_with_linear_warmup():
    """The lr curve of the 1/16 config against mmcv 1.x's formula (poly from iteration 0, warm-up factor on top)."""
    from mmengine.optim import OptimWrapper
    from mmengine.registry import PARAM_SCHEDULERS
    cfg = Config.fromfile(osp.join(CONFIG_DIR, 'internvit_6b_linear_fewshot_1of16_ade20k_504_5k_fsdp.py'))
    base = [4e-5, 4e-5 * 0.95 ** 49]  # a head group and the embeddings group
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in base]
    optimizer = torch.optim.AdamW([dict(params=[p], lr=lr) for p, lr in zip(params, base)])
    wrapper = OptimWrapper(optimizer)
    scheduler = PARAM_SCHEDULERS.build(dict(cfg.param_scheduler[0], optimizer=wrapper))
    max_iters, warmup, ratio = 5000, 100, 1e-6
    seen = {}
    for t in range(max_iters):
        seen[t] = [g['lr'] for g in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
    for t in (0, 1, 50, 99, 100, 101, 1000, 2500, 4999):
        poly = (1 - t / max_iters) ** 1.0
        factor = poly * (1 - (1 - t / warmup) * (1 - ratio)) if t < warmup else poly
        assert seen[t] == pytest.approx([b * factor for b in base], rel=1e-9, abs=1e-20), t
    # LinearLR to 100 then PolyLR from 100 (a poly that restarts after warm-up) would give the full 4e-5 here
    assert seen[100][0] == pytest.approx(4e-5 * 0.98) and seen[100][0] < 4e-5 * 0.99


def _mmcv1_rescale(h, w, scale):
    """mmcv 1.x imrescale with a (long, short) bound, then ResizeToMultiple(14) (ceil)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    nw, nh = int(w * factor + 0.5), int(h * factor + 0.5)
    return -(-nh // 14) * 14, -(-nw // 14) * 14


@pytest.mark.parametrize('hw', [(375, 500), (333, 517), (683, 512), (256, 1400)])
def test_test_resize_matches_the_published_pipelines(hw):
    import numpy as np
    from mmcv.transforms import Compose
    h, w = hw
    image = np.zeros((h, w, 3), np.uint8)
    for kind, steps in TEST_RESIZE.items():
        with DefaultScope.overwrite_default_scope('mmseg'):
            out = Compose(steps)(dict(img=image.copy(), img_shape=(h, w), ori_shape=(h, w)))
        if kind == SHORT_504:  # SETR_Resize: floats (504*h/w, 504) or (504, 504*w/h) handed to imrescale
            target = (504 * h / w, 504) if h > w else (504, 504 * w / h)
            expected = _mmcv1_rescale(h, w, target)
        else:
            expected = _mmcv1_rescale(h, w, (2016, 504))
        assert out['img'].shape[:2] == expected, (kind, hw)
