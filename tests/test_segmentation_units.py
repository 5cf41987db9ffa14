"""Segmentation building blocks: neck, linear head, layer-wise lr decay, few-shot subsets, input checks, padding."""
import os
import os.path as osp
import random
import re

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.structures import PixelData
from mmseg.registry import DATASETS, MODELS
from mmseg.structures import SegDataSample
from PIL import Image

import segmentation  # noqa: F401  (registers everything)
from segmentation.datasets import few_shot_subset
from segmentation.few_shot import list_image_stems, write_split_files
from segmentation.layer_decay import InternViTLayerDecayOptimizerConstructor, clean_param_name, internvit_layer_id
from segmentation.neck import ViTFeaturePyramid
from segmentation.testing import QUICKSTART_CONFIG

TINY_DATASET = dict(num_train=6)  # data_root: tests/conftest.py
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module', autouse=True)
def seg_scope():
    with DefaultScope.overwrite_default_scope('mmseg'):
        yield


def tiny_model_cfg(**backbone):
    cfg = Config.fromfile(QUICKSTART_CONFIG)
    cfg.model.backbone.update(backbone)
    return cfg


# ------------------------------------------------------------------------------------------------------- neck/head
def test_pyramid_scales_and_structure():
    neck = ViTFeaturePyramid(in_channels=8, scales=(4, 2, 1, 0.5), norm_cfg=dict(type='BN'))
    maps = [torch.randn(2, 8, 6, 6) for _ in range(4)]
    outs = neck(maps)
    assert [tuple(o.shape) for o in outs] == [(2, 8, 24, 24), (2, 8, 12, 12), (2, 8, 6, 6), (2, 8, 3, 3)]
    x4 = [type(m).__name__ for m in neck.branches[0]]
    assert x4 == ['ConvTranspose2d', 'BatchNorm2d', 'GELU', 'ConvTranspose2d']
    assert [type(m).__name__ for m in neck.branches[1]] == ['ConvTranspose2d']
    assert torch.equal(outs[2], maps[2])  # x1 is the identity
    assert torch.equal(outs[3], torch.nn.functional.max_pool2d(maps[3], 2))
    with pytest.raises(ValueError, match=r'needs one input per scale, got 3'):
        neck(maps[:3])
    with pytest.raises(ValueError, match='powers of two'):
        ViTFeaturePyramid(in_channels=8, scales=(3, 1))


def test_linear_bn_head_is_bn_then_1x1_conv():
    head = MODELS.build(dict(type='LinearBNHead', in_channels=16, in_index=0, num_classes=5, dropout_ratio=0.0,
                             norm_cfg=dict(type='BN')))
    head.eval()
    x = torch.randn(2, 16, 7, 7)
    with torch.no_grad():
        head.norm.running_mean.uniform_(-1, 1)
        head.norm.running_var.uniform_(0.5, 2)
        expected = head.conv_seg(torch.nn.functional.batch_norm(
            x, head.norm.running_mean, head.norm.running_var, head.norm.weight, head.norm.bias, eps=head.norm.eps))
        assert torch.allclose(head([x]), expected, atol=1e-6)
    assert head.conv_seg.kernel_size == (1, 1)
    with pytest.raises(ValueError, match='channels must equal the input channels'):
        MODELS.build(dict(type='LinearBNHead', in_channels=16, channels=8, num_classes=5))


# --------------------------------------------------------------------------------------------------- layer decay
def test_layer_ids_follow_internvit_names():
    assert internvit_layer_id('backbone.embeddings.position_embedding', 48) == 0
    assert internvit_layer_id('backbone.encoder.layers.0.attn.qkv.weight', 48) == 1
    assert internvit_layer_id('backbone.encoder.layers.47.ls2', 48) == 48
    assert internvit_layer_id('decode_head.conv_seg.weight', 48) == 49
    assert internvit_layer_id('neck.branches.0.0.weight', 48) == 49
    fsdp = '_fsdp_wrapped_module.backbone.encoder.layers.3._fsdp_wrapped_module.mlp.fc1.weight'
    assert clean_param_name(fsdp) == 'backbone.encoder.layers.3.mlp.fc1.weight'
    assert internvit_layer_id(fsdp, 48) == 4
    with pytest.raises(ValueError, match='block 50.*num_layers is 48'):
        internvit_layer_id('backbone.encoder.layers.50.ls1', 48)


@pytest.mark.parametrize('embeddings_weight_decay', [True, False], ids=['published', 'exempt-embeddings'])
def test_layer_decay_groups_lrs_and_weight_decay(embeddings_weight_decay):
    model = MODELS.build(tiny_model_cfg(preset='internvit_tiny').model)  # RMSNorm + qk-norm, like 6B
    base_lr, wd, rate, depth = 1e-3, 0.05, 0.9, 4
    paramwise = dict(layer_decay_rate=rate)
    if not embeddings_weight_decay:
        paramwise['embeddings_weight_decay'] = False  # the published runs decayed them: that is the default
    wrapper = InternViTLayerDecayOptimizerConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=base_lr, weight_decay=wd)), paramwise)(model)
    by_param = {}
    for group in wrapper.optimizer.param_groups:
        for p in group['params']:
            by_param[id(p)] = group
    named = dict(model.named_parameters())
    assert len(by_param) == len(named)  # every trainable parameter in exactly one group

    def group_of(name):
        return by_param[id(named[name])]

    for name in named:
        layer = internvit_layer_id(name, depth)
        assert group_of(name)['lr'] == pytest.approx(base_lr * rate ** (depth + 1 - layer)), name
    assert group_of('backbone.embeddings.patch_embedding.weight')['lr'] == pytest.approx(base_lr * rate ** 5)
    assert group_of('backbone.encoder.layers.3.mlp.fc1.weight')['lr'] == pytest.approx(base_lr * rate)
    assert group_of('decode_head.conv_seg.weight')['lr'] == pytest.approx(base_lr)
    embeddings = ['backbone.embeddings.position_embedding', 'backbone.embeddings.class_embedding']
    for name in embeddings:
        assert group_of(name)['weight_decay'] == (wd if embeddings_weight_decay else 0.0), name
    no_decay = ['backbone.encoder.layers.0.ls1', 'backbone.encoder.layers.0.ls2',
                'backbone.encoder.layers.0.norm1.weight',
                'backbone.encoder.layers.1.norm2.weight', 'backbone.encoder.layers.2.attn.q_norm.weight',
                'backbone.encoder.layers.2.attn.k_norm.weight', 'backbone.encoder.layers.0.attn.proj.bias',
                'decode_head.conv_seg.bias', 'neck.branches.0.1.weight']
    for name in no_decay:
        assert group_of(name)['weight_decay'] == 0.0, name
    for name in ['backbone.encoder.layers.0.attn.qkv.weight', 'backbone.embeddings.patch_embedding.weight',
                 'decode_head.conv_seg.weight', 'neck.branches.0.0.weight']:
        assert group_of(name)['weight_decay'] == wd, name


def test_layer_decay_skips_frozen_and_checks_depth():
    model = MODELS.build(tiny_model_cfg(preset='internvit_tiny', frozen=True).model)
    wrapper = InternViTLayerDecayOptimizerConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05)),
        dict(layer_decay_rate=0.9))(model)
    in_optimizer = {id(p) for g in wrapper.optimizer.param_groups for p in g['params']}
    assert not any(id(p) in in_optimizer for p in model.backbone.parameters())
    with pytest.raises(ValueError, match='num_layers=7 does not match the backbone depth 4'):
        InternViTLayerDecayOptimizerConstructor(dict(optimizer=dict(type='AdamW', lr=1e-3)),
                                                dict(layer_decay_rate=0.9, num_layers=7))(model)
    with pytest.raises(KeyError, match="unknown paramwise_cfg keys \\['decay_rate'\\]"):
        InternViTLayerDecayOptimizerConstructor(dict(optimizer=dict(type='AdamW', lr=1e-3)), dict(decay_rate=0.9))


# ------------------------------------------------------------------------------------------------------ few-shot
def test_few_shot_subsets_are_deterministic_nested_and_sized():
    names = [f'ADE_train_{i:08d}' for i in range(1, 20211)]
    subsets = {n: few_shot_subset(names, 1 / n) for n in (16, 8, 4, 2, 1)}
    assert [len(subsets[n]) for n in (16, 8, 4, 2, 1)] == [1263, 2526, 5053, 10105, 20210]  # floor(n * f + 0.5)
    for small, large in ((16, 8), (8, 4), (4, 2), (2, 1)):
        assert set(subsets[small]) <= set(subsets[large])
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    assert few_shot_subset(shuffled, 1 / 16) == subsets[16]  # independent of listing order
    other_seed = few_shot_subset(names, 1 / 16, seed=1)
    assert len(set(other_seed) & set(subsets[16])) < 200  # a different seed draws a different subset
    assert sorted(subsets[1]) == sorted(names)
    with pytest.raises(ValueError, match=r'fraction must be in \(0, 1\], got 0'):
        few_shot_subset(names, 0)


def test_dataset_fraction_matches_split_files(data_root, tmp_path):
    img_dir = osp.join(data_root, 'images', 'training')
    split_files = write_split_files(list_image_stems(img_dir), str(tmp_path), seed=0)
    base = dict(type='SyntheticADE20KDataset', data_root=data_root, serialize_data=False,
                data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'))
    for path, fraction in zip(split_files, (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)):
        by_fraction = DATASETS.build(dict(base, fraction=fraction))
        by_file = DATASETS.build(dict(base, ann_file=path))
        assert sorted(i['img_path'] for i in by_fraction.data_list) == sorted(i['img_path'] for i in by_file.data_list)
    assert len(DATASETS.build(dict(base, fraction=1 / 2))) == 3
    with pytest.raises(FileExistsError, match='exists; pass --overwrite'):
        write_split_files(list_image_stems(img_dir), str(tmp_path))


# ---------------------------------------------------------------------------------------------------- bad input
def test_published_shuffle_subset_is_the_seeded_shuffle_of_sorted_names(data_root):
    """The published mmseg-0.x rule, written out: sorted file names, random.seed(seed), random.shuffle, first n // k."""
    from segmentation.datasets import published_shuffle_subset
    names = [f'ADE_train_{i:08d}.jpg' for i in range(1, 20211)]
    subset = published_shuffle_subset(reversed(names), 1 / 16, seed=42)
    reference, state = sorted(names), random.getstate()
    random.seed(42)  # what mmseg 0.x's set_random_seed did, then the dataset's random.shuffle(img_infos)
    random.shuffle(reference)
    random.setstate(state)
    assert subset == reference[:20210 // 16] and len(subset) == 1263
    assert len(published_shuffle_subset(names, 1 / 4, seed=42)) == 20210 // 4  # 5052 (the nested rule keeps 5053)
    dataset = _dataset(data_root, fraction=0.5, subset_rule='published_shuffle', subset_seed=3)
    files = sorted(os.listdir(osp.join(data_root, 'images', 'training')))
    expected = published_shuffle_subset(files, 0.5, seed=3)
    assert sorted(osp.basename(d['img_path']) for d in dataset.data_list) == sorted(expected)
    with pytest.raises(ValueError, match="subset_rule must be one of"):
        _dataset(data_root, fraction=0.5, subset_rule='random')


def _dataset(root, **kwargs):
    return DATASETS.build(dict(
        type='SyntheticADE20KDataset', data_root=root,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=[dict(type='LoadImageFromFile'), dict(type='LoadAndCheckAnnotations'), dict(type='PackSegInputs')],
        test_mode=True, serialize_data=False, **kwargs))


@pytest.fixture
def broken_data(data_root, tmp_path):
    import shutil
    root = str(tmp_path / 'broken')
    shutil.copytree(data_root, root)
    return root


def test_missing_dataset_folder_is_named(tmp_path):
    missing = str(tmp_path / 'nowhere' / 'ADEChallengeData2016')
    with pytest.raises(FileNotFoundError, match=re.escape(missing) + r'.*does not exist'):
        _dataset(missing)


def test_image_without_annotation_is_named(broken_data):
    os.remove(osp.join(broken_data, 'annotations', 'training', 'synth_training_00003.png'))
    with pytest.raises(FileNotFoundError, match=r'synth_training_00003\.jpg has no annotation: expected .*'
                                                r'annotations/training/synth_training_00003\.png'):
        _dataset(broken_data)


def test_annotation_of_another_size_is_named(broken_data):
    path = osp.join(broken_data, 'annotations', 'training', 'synth_training_00002.png')
    Image.fromarray(np.ones((50, 60), np.uint8)).save(path)
    dataset = _dataset(broken_data)
    dataset[0]  # a good pair loads
    with pytest.raises(ValueError, match=r'annotation .*synth_training_00002\.png is 50x60 \(HxW\) but its image '
                                         r'.*synth_training_00002\.jpg is \d+x\d+'):
        dataset[2]


def test_label_above_class_count_is_named(broken_data):
    path = osp.join(broken_data, 'annotations', 'training', 'synth_training_00001.png')
    labels = np.array(Image.open(path))
    labels[:5, :5] = 9  # 5 classes: valid raw values are 0 (ignored) and 1..5
    Image.fromarray(labels).save(path)
    with pytest.raises(ValueError, match=r'annotation .*synth_training_00001\.png has label value\(s\) \[9\] above '
                                         r'the class count: the dataset has 5 classes'):
        _dataset(broken_data)[1]


# ------------------------------------------------------------------------------------ multiples of 14 at test time
@pytest.mark.parametrize('mode', ['whole', 'slide'])
def test_inference_pads_odd_sizes_to_the_patch_size(mode):
    cfg = tiny_model_cfg()
    if mode == 'whole':
        cfg.model.test_cfg = dict(mode='whole')
    model = MODELS.build(cfg.model).eval()
    torch.manual_seed(0)
    outputs = []
    for h, w in ((97, 131), (60, 45)):  # neither a multiple of 14; the second is smaller than the 112 slide crop
        image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8)
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w)))
        sample.gt_sem_seg = PixelData(data=torch.zeros(1, h, w, dtype=torch.long))
        with torch.no_grad():
            out = model.test_step(dict(inputs=[image], data_samples=[sample]))[0]
        outputs.append(out)
        assert tuple(out.pred_sem_seg.data.shape) == (1, h, w)
        assert tuple(out.seg_logits.data.shape) == (5, h, w)
    assert torch.isfinite(outputs[0].seg_logits.data).all()


def test_final_weights_hook_saves_weights_only_after_training(tmp_path):
    from segmentation.hooks import FinalWeightsHook
    calls = []

    class FakeRunner:
        work_dir, iter = str(tmp_path), 80000

        def save_checkpoint(self, out_dir, filename, **kwargs):
            calls.append((out_dir, filename, kwargs))

    FinalWeightsHook().after_train(FakeRunner())
    assert calls == [(str(tmp_path), 'weights_iter_80000.pth',
                      dict(save_optimizer=False, save_param_scheduler=False, by_epoch=False))]
