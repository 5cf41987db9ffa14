"""Every segmentation config parses, respects the patch size, and (6B/300M) builds on the meta device as published."""
import glob
import os.path as osp

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
                                                      'FSDPStrategy'),
    'internvit_6b_upernet_full_ade20k_504_80k_deepspeed': ('internvit_6b_224', [11, 23, 35, 47], False, 0.4, 0.95,
                                                           0.05, 'DeepSpeedStrategy'),
    'internvit_300m_linear_frozen_ade20k_504_80k': ('internvit_300m_448', [23], True, 0.0, 1.0, 0.0, 'Runner'),
    'internvit_300m_upernet_frozen_ade20k_504_80k': ('internvit_300m_448', [5, 11, 17, 23], True, 0.0, 1.0, 0.05,
                                                     'Runner'),
    'internvit_300m_upernet_full_ade20k_504_80k': ('internvit_300m_448', [5, 11, 17, 23], False, 0.2, 0.9, 0.05,
                                                   'Runner'),
}
FEW_SHOT = {16: 5000, 8: 10000, 4: 20000, 2: 40000, 1: 80000}
for _n, _iters in FEW_SHOT.items():
    EXPECTED[f'internvit_6b_linear_fewshot_1of{_n}_ade20k_504_{_iters // 1000}k_fsdp'] = (
        'internvit_6b_224', [47], False, 0.4, 0.95, 0.05, 'FSDPStrategy')


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
        warmup, poly = cfg.param_scheduler
        assert (warmup.type, warmup.end, poly.type, poly.begin, poly.power) == ('LinearLR', 1500, 'PolyLR', 1500, 1.0)
        assert poly.end == cfg.train_cfg.max_iters
        assert cfg.model.backbone.dtype in ('bfloat16', None)


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_backbone_builds_on_meta_as_published(name):
    preset, out_indices, frozen, drop_path, layer_decay, weight_decay, runner = EXPECTED[name]
    cfg = Config.fromfile(osp.join(CONFIG_DIR, name + '.py'))
    with DefaultScope.overwrite_default_scope('mmseg'), torch.device('meta'):
        model = MODELS.build(cfg.model)
    backbone = model.backbone
    assert backbone.arch == PRESETS[preset]
    assert sum(p.numel() for p in backbone.parameters()) == PUBLISHED_PARAMS[preset]
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
    if runner == 'FSDPStrategy':
        assert cfg.strategy.model_wrapper.type == 'InternViTBlockFSDP'
        assert cfg.strategy.model_wrapper.block_param_dtype == 'bfloat16'
        assert sum(isinstance(m, Block) for m in model.modules()) == PRESETS[preset].depth  # FSDP units
    if runner == 'DeepSpeedStrategy':
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
