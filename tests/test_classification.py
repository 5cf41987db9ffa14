"""Linear-probe building blocks on hand-built inputs: features, sweep heads, checkpoints, datasets, metrics, cache."""
import copy
import json
import os
import threading
import types

import numpy as np
import pytest
import torch
from PIL import Image

import classification  # noqa: F401  (registers everything)
from classification import (
    BackboneMismatchError,
    CachedFeatures,
    DatasetLayoutError,
    FeatureSpec,
    HeldOutSplit,
    ImageNetAccuracy,
    ImageNetFileList,
    ImageNetFolder,
    ImageNetReaL,
    ImageNetV2Folder,
    ImageReadError,
    LinearProbeOptimWrapperConstructor,
    MultiSetTestLoop,
    StaleFeatureCacheError,
    apply_sweep_switch,
    format_results_table,
    probe_record,
    stratified_holdout,
    topk_hits,
)
from classification.heads import head_losses

from helpers import tiny_probe

EVAL_56 = dict(type='ProbeEvalTransform', size=56)


pytestmark = pytest.mark.usefixtures('one_thread', 'private_hash_cache')  # tests/conftest.py


def write_image(path, color, size=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (size, size), tuple(int(c) for c in color)).save(path)


def image_folder(root, classes, per_class=3, name='{c}_{k}.png'):
    rng = np.random.default_rng(0)
    for c in classes:
        for k in range(per_class):
            write_image(root / c / name.format(c=c, k=k), rng.integers(0, 255, 3))
    return root


# ------------------------------------------------------------------------------------------------ features, heads
def test_feature_choices_are_slices_of_the_backbone_tokens():
    model = tiny_probe(sweep=True, sweep_lrs=[0.1], sweep_features=['cls_mean', 'cls', 'mean', 'cls_mean_last2'])
    x = torch.randn(2, 3, 56, 56)
    summaries = model.summaries(x)
    assert summaries.shape == (2, 2, 2, 64) and model.backbone_images_processed == 2
    last = model.backbone.forward_features(x)
    before, final = model.backbone.forward_intermediates(x, [-2, -1], 'tokens', with_cls=True)
    pooled = {name: FeatureSpec.parse(name).select(summaries) for name in ('cls_mean', 'cls', 'mean', 'cls_mean_last2')}
    torch.testing.assert_close(pooled['cls_mean'], torch.cat([last[:, 0], last[:, 1:].mean(1)], 1))
    torch.testing.assert_close(pooled['cls'], last[:, 0])
    torch.testing.assert_close(pooled['mean'], last[:, 1:].mean(1))
    torch.testing.assert_close(pooled['cls_mean_last2'], torch.cat(
        [before[:, 0], before[:, 1:].mean(1), final[:, 0], final[:, 1:].mean(1)], 1), rtol=1e-5, atol=1e-5)
    assert [h.fc.in_features for h in model.heads] == [128, 64, 64, 256]
    assert model.head_names == ['cls_mean_lr0.1', 'cls_lr0.1', 'mean_lr0.1', 'cls_mean_last2_lr0.1']
    with pytest.raises(ValueError, match="unknown feature choice 'cls_max'"):
        FeatureSpec.parse('cls_max')
    with pytest.raises(TypeError, match='sweep is the on/off switch'):
        tiny_probe(sweep=dict(lrs=[0.1]))


def test_sweep_heads_share_one_backbone_pass_and_learn_independently():
    model = tiny_probe(sweep=True, sweep_lrs=[0.1, 1.0], sweep_features=['cls_mean', 'cls'])
    model.train()
    x, labels = torch.randn(6, 3, 56, 56), torch.tensor([0, 1, 2, 3, 0, 1])
    losses = model(x, dict(labels=labels), mode='loss')
    assert model.backbone_images_processed == 6  # four heads, one backbone pass
    losses['loss'].backward()
    summed = [h.fc.weight.grad.clone() for h in model.heads]
    summaries = model.summaries(x)
    for i, head in enumerate(model.heads):
        model.zero_grad()
        head_losses(model.head_logits(summaries, [i]), labels)[0].backward()
        torch.testing.assert_close(head.fc.weight.grad, summed[i])  # the sum gives each head its own gradient
    torch.testing.assert_close(losses['ce_mean'] * 4, losses['loss'].detach())


def test_optimizer_has_one_group_per_head_at_its_lr():
    model = tiny_probe(sweep=True, sweep_lrs=[0.01, 0.1, 1.0], sweep_features=['cls_mean', 'mean'])
    wrapper = LinearProbeOptimWrapperConstructor(dict(optimizer=dict(type='SGD', momentum=0.9)))(model)
    groups = wrapper.optimizer.param_groups
    assert [g['lr'] for g in groups] == [h.lr for h in model.heads] == [0.01, 0.1, 1.0] * 2
    assert [g['head'] for g in groups] == model.head_names
    ids = [{id(p) for p in g['params']} for g in groups]
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1:])  # BN and Linear are per head
    assert {id(p) for p in model.heads[2].parameters()} == ids[2]
    assert not any(id(p) in set().union(*ids) for p in model.backbone.parameters())
    with pytest.raises(ValueError, match=r'optim_wrapper.optimizer.lr=0.1 is not used by a linear probe'):
        LinearProbeOptimWrapperConstructor(dict(optimizer=dict(type='SGD', lr=0.1)))


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_holds_heads_only_and_refuses_another_backbone(tmp_path):
    from mmengine.runner.checkpoint import load_checkpoint

    model = tiny_probe(seed=0)
    with torch.no_grad():
        model.heads[0].fc.weight.add_(1.0)
    state = model.state_dict()
    assert not [k for k in state if k.startswith('backbone.')]
    assert {k for k in state if not k.startswith('heads.')} == {'selected_head', '_extra_state'}
    record = probe_record(state)
    assert state['_extra_state'].dtype == torch.uint8  # a tensor, so DDP's start-up broadcast can carry it
    assert record['backbone']['sha256'] == model.backbone_identity()['sha256']
    assert len(record['backbone']['sha256']) == 64

    same = tiny_probe(seed=0)
    same.load_state_dict(state)  # strict: the missing backbone keys are expected
    torch.testing.assert_close(same.heads[0].fc.weight, model.heads[0].fc.weight)

    other = tiny_probe(seed=1)
    path = tmp_path / 'probe.pth'
    torch.save(dict(state_dict=state, meta={}), path)
    for load in (lambda: other.load_state_dict(state), lambda: load_checkpoint(other, str(path))):
        with pytest.raises(BackboneMismatchError) as err:
            load()
        assert record['backbone']['sha256'] in str(err.value)
        assert other.backbone_identity()['sha256'] in str(err.value)
    with pytest.raises(ValueError, match='no linear-probe record'):
        same.load_state_dict({k: v for k, v in state.items() if k != '_extra_state'})
    sweep = tiny_probe(seed=0, sweep=True, sweep_lrs=[0.1, 1.0], sweep_features=['cls'])
    with pytest.raises(ValueError, match=r"checkpoint heads \['cls_mean_lr0.1'\]"):
        sweep.load_state_dict(state, strict=False)


def test_backbone_hash_is_layout_independent_and_cached_per_file(tmp_path):
    model = tiny_probe(seed=0)
    weights = tmp_path / 'tiny.pth'
    torch.save(model.backbone.state_dict(), weights)
    from_file = tiny_probe(seed=5, backbone=dict(type='InternViT', preset='internvit_tiny', pretrained=str(weights),
                                                 frozen=True))
    identity = from_file.backbone_identity()
    assert identity['sha256'] == model.backbone_identity()['sha256']  # same numbers, random init vs file
    assert identity['pretrained'] == str(weights)
    cache_file = tmp_path / 'hash_cache' / 'backbone_sha256.json'
    cache = json.loads(cache_file.read_text())
    assert list(cache.values()) == [identity['sha256']]
    # A second model trusts the cache entry (keyed by path, size, mtime) ...
    cache_file.write_text(json.dumps({k: 'f' * 64 for k in cache}))
    again = tiny_probe(backbone=dict(type='InternViT', preset='internvit_tiny', pretrained=str(weights), frozen=True))
    assert again.backbone_identity()['sha256'] == 'f' * 64
    # ... until the file changes.
    os.utime(weights, ns=(os.stat(weights).st_atime_ns, os.stat(weights).st_mtime_ns + 10 ** 9))
    fresh = tiny_probe(backbone=dict(type='InternViT', preset='internvit_tiny', pretrained=str(weights), frozen=True))
    assert fresh.backbone_identity()['sha256'] == identity['sha256']


def test_test_loop_sets_pipeline_and_refuses_an_unselected_sweep():
    sets = [dict(name='IN-1K', dataset=dict(type='ImageNetFolder', pipeline=EVAL_56)),
            dict(name='A', dataset=dict(type='CachedFeatures', dataset=dict(type='ImageNetFolder')))]
    pipeline = dict(type='ProbeEvalTransform', size=448)
    loop = MultiSetTestLoop(None, {}, {}, sets=sets, pipeline=pipeline)
    assert loop.sets[0]['dataset']['pipeline'] == loop.sets[1]['dataset']['dataset']['pipeline'] == pipeline
    assert MultiSetTestLoop(None, {}, {}, sets=sets, only=['A']).sets == [sets[1]]
    with pytest.raises(ValueError, match=r"unknown test set\(s\) \['Sketchy'\]"):
        MultiSetTestLoop(None, {}, {}, sets=sets, only=['Sketchy'])
    model = tiny_probe(sweep=True, sweep_lrs=[0.1, 1.0], sweep_features=['cls'])
    loop = MultiSetTestLoop(types.SimpleNamespace(model=model), {}, {}, sets=sets)
    with pytest.raises(RuntimeError, match='none was chosen on held-out data'):
        loop.run()


# ------------------------------------------------------------------------------------------------ metrics
def test_topk_restricted_to_a_class_subset():
    logits = torch.tensor([[5.0, 1.0, 4.0, 0.0, 3.0, 2.0]])
    assert topk_hits(logits, 0, None, None, (1, 5))[1].tolist() == [True]
    # ImageNet-A/-R: only classes 1, 3, 4 compete, so class 4 wins although class 0 has the largest logit.
    hits = topk_hits(logits, 4, None, [1, 3, 4], (1, 5))
    assert hits[1].tolist() == [True] and hits[5].tolist() == [True]
    hits = topk_hits(logits, 1, None, [1, 3, 4], (1, 5))
    assert hits[1].tolist() == [False] and hits[5].tolist() == [True]  # top-5 of 3 classes holds them all


def test_accuracy_metric_with_masked_logits_and_real_labels():
    metric = ImageNetAccuracy(topk=(1, 2))
    metric.dataset_meta = dict(class_subset=[1, 3])
    rows = [([9.0, 1.0, 0.0, 2.0], 3), ([9.0, 2.0, 0.0, 1.0], 3), ([0.0, 5.0, 9.0, 1.0], 1)]
    metric.process(None, [dict(logits=torch.tensor([row]), label=y, real_labels=None) for row, y in rows])
    result = metric.compute_metrics(metric.results)
    assert result['top1'] == pytest.approx(200 / 3) and result['top2'] == pytest.approx(100.0)
    assert result['num_classes'] == 2

    real = ImageNetAccuracy(real=True)
    real.dataset_meta = {}
    predicted = [0, 2, 1, 1]  # argmax of each sample
    labels = [[0], [1, 2], [], [2]]  # ReaL: hit, hit (second label), unlabeled (skipped), miss
    real.process(None, [dict(logits=torch.nn.functional.one_hot(torch.tensor([p]), 3).float(), label=-1,
                             real_labels=r) for p, r in zip(predicted, labels)])
    result = real.compute_metrics(real.results)
    # top-5 as the published ReaL table reports it (any of the top k inside the label set; k <= 3 classes here)
    assert result == dict(num_scored=3.0, num_classes=3.0, top1=pytest.approx(200 / 3), top5=100.0)
    with pytest.raises(ValueError, match='needs ReaL labels'):
        real.process(None, [dict(logits=torch.zeros(1, 3), label=0, real_labels=None)])


def test_results_table_has_the_published_shape():
    table = format_results_table({'IN-1K': dict(top1=88.21, top5=98.0), 'ReaL': dict(top1=90.4)},
                                 reference={'IN-1K': 88.2, 'ReaL': 90.4}, title='probe')
    assert table.splitlines() == ['| probe | IN-1K | ReaL |', '|---|---|---|', '| top-1 | 88.21 | 90.40 |',
                                  '| top-5 | 98.00 | - |', '| published top-1 | 88.2 | 90.4 |']


# ------------------------------------------------------------------------------------------------ datasets
def test_subset_folders_give_the_class_mask(tmp_path):
    classes = ['n01', 'n02', 'n03', 'n04', 'n05']
    (tmp_path / 'classes.txt').write_text(''.join(f'{c} name\n' for c in classes))
    root = image_folder(tmp_path / 'imagenet-r', ['n02', 'n05'], per_class=2)
    ds = ImageNetFolder(str(root), EVAL_56, classes=str(tmp_path / 'classes.txt'), class_subset_from_folders=True,
                        name='R')
    assert ds.metainfo['class_subset'] == [1, 4] and ds.labels.tolist() == [1, 1, 4, 4]
    item = ds[0]
    assert item['inputs'].shape == (3, 56, 56) and item['inputs'].dtype == torch.uint8 and item['label'] == 1
    image_folder(root, ['n99'], per_class=1)
    with pytest.raises(DatasetLayoutError, match=r'R: folder .*imagenet-r/n99 is not a class of .*classes.txt'):
        ImageNetFolder(str(root), EVAL_56, classes=str(tmp_path / 'classes.txt'), class_subset_from_folders=True,
                       name='R')


def test_real_labels_follow_the_val_file_numbers(tmp_path):
    root = tmp_path / 'val'
    for number, wnid in [(3, 'n02'), (1, 'n01'), (2, 'n03'), (4, 'n01')]:
        write_image(root / wnid / f'ILSVRC2012_val_{number:08d}.JPEG', (number * 40, 0, 0))
    (tmp_path / 'real.json').write_text(json.dumps([[0], [1, 2], [], [2]]))
    ds = ImageNetReaL(str(root), str(tmp_path / 'real.json'), EVAL_56, classes=['n01', 'n02', 'n03'])
    by_number = {int(p[-13:-5]): (label, r) for (p, label), r in zip(ds.samples, ds.real_labels)}
    assert by_number == {1: (0, [0]), 2: (2, [1, 2]), 3: (1, []), 4: (0, [2])}
    (tmp_path / 'short.json').write_text(json.dumps([[0], [1], [2]]))
    with pytest.raises(DatasetLayoutError, match=r'ILSVRC2012_val_00000004.JPEG is val image 4, but .*short.json has '
                                                 r'labels for images 1..3'):
        ImageNetReaL(str(root), str(tmp_path / 'short.json'), EVAL_56, classes=['n01', 'n02', 'n03'])


def test_layout_errors_name_the_path(tmp_path):
    classes = ['n01', 'n02', 'n03']
    root = image_folder(tmp_path / 'val', ['n01', 'n03'])
    with pytest.raises(DatasetLayoutError, match=r'IN-1K: class folder .*val/n02 is missing \(1 of 3 classes'):
        ImageNetFolder(str(root), EVAL_56, classes=classes)
    (root / 'n02').mkdir()
    with pytest.raises(DatasetLayoutError, match=r'class folder .*val/n02 holds no images'):
        ImageNetFolder(str(root), EVAL_56, classes=classes)
    v2 = image_folder(tmp_path / 'v2', ['0', '2'])
    with pytest.raises(DatasetLayoutError, match=r'V2: class folder .*v2/1 is missing'):
        ImageNetV2Folder(str(v2), EVAL_56, classes=classes)
    ann = tmp_path / 'train.txt'
    ann.write_text('n01/n01_0.png 0\n\nn03/n03_1.png 2\n')
    listed = ImageNetFileList(str(root), str(ann), EVAL_56, classes=classes)
    assert listed.labels.tolist() == [0, 2] and listed[1]['inputs'].shape == (3, 56, 56)
    ann.write_text('n01/n01_0.png 0\nn01/n01_1.png seven\n')
    with pytest.raises(DatasetLayoutError, match=r'train.txt:2: expected "<relative path> <label>"'):
        ImageNetFileList(str(root), str(ann), EVAL_56, classes=classes)
    ann.write_text('n01/n01_0.png 0\nn03/n03_1.png 3\n')
    with pytest.raises(DatasetLayoutError, match=r'train.txt:2: label 3 is outside 0..2'):
        ImageNetFileList(str(root), str(ann), EVAL_56, classes=classes)
    write_image(root / 'n02' / 'ok.png', (1, 2, 3))
    broken = root / 'n02' / 'broken.JPEG'
    broken.write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg')
    ds = ImageNetFolder(str(root), EVAL_56, classes=classes)
    index = [p for p, _ in ds.samples].index(str(broken))
    with pytest.raises(ImageReadError, match=r'cannot read image .*n02/broken.JPEG'):
        ds[index]


def test_heldout_split_is_stratified_deterministic_and_disjoint(tmp_path):
    labels = np.repeat(np.arange(3), 10)
    heldout = stratified_holdout(labels, 0.2, seed=0)
    assert np.bincount(labels[heldout]).tolist() == [2, 2, 2]
    assert heldout.tolist() == stratified_holdout(labels, 0.2, seed=0).tolist()
    assert heldout.tolist() != stratified_holdout(labels, 0.2, seed=1).tolist()
    root = image_folder(tmp_path / 'train', ['n01', 'n02'], per_class=5)
    base = dict(type='ImageNetFolder', root=str(root), pipeline=EVAL_56)
    train, held = HeldOutSplit(base, 'train', 0.2), HeldOutSplit(base, 'heldout', 0.2)
    assert len(train) == 8 and len(held) == 2 and held.metainfo['name'] == 'IN-1K-heldout'
    assert sorted(train.indices.tolist() + held.indices.tolist()) == list(range(10))
    assert sorted(held.labels.tolist()) == [0, 1]
    # Tied to the sweep switch: the single head holds nothing out, a sweep needs held-out data.
    whole, none = HeldOutSplit(base, 'train', 0.2, sweep=False), HeldOutSplit(base, 'heldout', 0.2, sweep=False)
    assert whole.indices.tolist() == list(range(10)) and len(none) == 0
    assert HeldOutSplit(base, 'heldout', 0.2, sweep=True).indices.tolist() == held.indices.tolist()
    with pytest.raises(ValueError, match='the sweep .* chooses its head on held-out training data'):
        HeldOutSplit(base, 'heldout', 0.0, sweep=True)


# ------------------------------------------------------------------------------------------------ feature cache
def test_feature_cache_extracts_once_resumes_and_refuses_stale(tmp_path):
    root = image_folder(tmp_path / 'train', ['n01', 'n02', 'n03'], per_class=6)
    source = dict(type='ImageNetFolder', root=str(root), pipeline=EVAL_56)
    settings = dict(cache_dir=str(tmp_path / 'cache'), shard_size=8, extract_batch_size=4, extract_num_workers=0)
    model = tiny_probe(sweep=True, sweep_lrs=[0.1], sweep_features=['cls_mean', 'cls_mean_last2'])
    cache = CachedFeatures(source, **settings)
    assert cache.prepare(model) == 18 and model.backbone_images_processed == 18
    assert sorted(p.name for p in (tmp_path / 'cache').iterdir()) == [
        'manifest.json', 'shard_00000.done', 'shard_00000.npy', 'shard_00001.done', 'shard_00001.npy',
        'shard_00002.done', 'shard_00002.npy']
    item = cache[13]
    image = cache.dataset[13]
    expected = model.summaries(model.data_preprocessor(dict(
        inputs=image['inputs'][None], data_samples={}, input_kind='images'))['inputs'])[0]
    torch.testing.assert_close(item['inputs'], expected, rtol=1e-5, atol=1e-5)
    assert item['input_kind'] == 'summaries' and item['label'] == image['label'] == 2

    assert CachedFeatures(source, **settings).prepare(model) == 0  # reused: no backbone pass
    assert model.backbone_images_processed == 19  # (the one above was the reference computation)

    shard0_mtime = (tmp_path / 'cache' / 'shard_00000.npy').stat().st_mtime_ns
    (tmp_path / 'cache' / 'shard_00001.done').unlink()  # an interrupted extraction
    assert CachedFeatures(source, **settings).prepare(model) == 8  # only the unfinished shard again
    assert (tmp_path / 'cache' / 'shard_00000.npy').stat().st_mtime_ns == shard0_mtime

    stale = [
        (CachedFeatures(dict(source, pipeline=dict(type='ProbeEvalTransform', size=42)), **settings), model,
         ['resolution: cached=56, now=42', 'transform: cached=']),
        (CachedFeatures(source, **settings), tiny_probe(seed=1, sweep=True, sweep_lrs=[0.1],
                                                        sweep_features=['cls_mean', 'cls_mean_last2']),
         ['backbone.sha256: cached=']),
        (CachedFeatures(source, **dict(settings, dtype='float16')), model, ["dtype: cached='float32', now='float16'"]),
    ]
    for cached, probe, fields in stale:
        with pytest.raises(StaleFeatureCacheError, match='refusing to reuse it') as err:
            cached.prepare(probe)
        for field in fields:
            assert field in str(err.value)
    write_image(root / 'n01' / 'extra.png', (0, 0, 0))
    with pytest.raises(StaleFeatureCacheError) as err:
        CachedFeatures(source, **settings).prepare(model)
    assert 'dataset.file_list_sha256' in str(err.value) and 'dataset.num_samples: cached=18, now=19' in str(err.value)
    with pytest.raises(ValueError, match='needs a deterministic pipeline'):
        CachedFeatures(dict(source, pipeline=dict(type='ProbeTrainTransform', size=56)), **settings)


def test_resumed_extraction_spreads_the_unfinished_shards_over_ranks(tmp_path, monkeypatch):
    from classification import feature_cache

    root = image_folder(tmp_path / 'train', ['n01', 'n02'], per_class=10)
    source = dict(type='ImageNetFolder', root=str(root), pipeline=EVAL_56)
    settings = dict(cache_dir=str(tmp_path / 'cache'), shard_size=4, extract_batch_size=4, extract_num_workers=0)
    models = [tiny_probe(), tiny_probe()]  # the same weights; one per simulated rank
    assert CachedFeatures(source, **settings).prepare(models[0]) == 20  # 5 shards
    for shard in (0, 2, 4):  # interrupted where shard % 2 == 0: all on rank 0 under a fixed rank assignment
        (tmp_path / 'cache' / f'shard_{shard:05d}.done').unlink()
    # Two ranks as two threads: a real barrier, so a rank that listed the shards late would see other lists.
    wait, rank = threading.Barrier(2).wait, threading.local()
    monkeypatch.setattr(feature_cache, 'barrier', lambda: wait(timeout=120))
    monkeypatch.setattr(feature_cache, 'get_dist_info', lambda: (rank.value, 2))
    extracted, errors = {}, []

    def run(r):
        rank.value = r
        try:
            extracted[r] = CachedFeatures(source, **settings).prepare(models[r])
        except BaseException as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert extracted == {0: 8, 1: 4}  # unfinished [0, 2, 4]: rank 0 takes 0 and 4, rank 1 takes 2


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize('name, preset, size, dim', [
    ('internvit_6b_224_linear_probe_in1k', 'internvit_6b_224', 224, 6400),
    ('internvit_6b_448_linear_probe_in1k', 'internvit_6b_448', 448, 6400),
    ('internvit_300m_448_linear_probe_in1k', 'internvit_300m_448', 448, 2048),
])
def test_configs_hold_the_published_recipe(name, preset, size, dim):
    from mmengine.config import Config
    from mmengine.registry import MODELS

    cfg = Config.fromfile(os.path.join(os.path.dirname(__file__), '..', 'configs', 'classification', f'{name}.py'))
    assert cfg.model.backbone.preset == preset and cfg.model.backbone.frozen and cfg.model.backbone.dtype == 'bfloat16'
    assert (cfg.model.feature, cfg.model.lr, cfg.model.sweep, cfg.model.num_classes) == ('cls_mean', 0.1, False, 1000)
    assert cfg.optim_wrapper.optimizer == dict(type='SGD', momentum=0.9, nesterov=True, weight_decay=0.0)
    assert cfg.train_cfg.max_epochs == 10 and cfg.auto_scale_lr == dict(base_batch_size=512, enable=True)
    assert [(s.type, s.t_initial, s.warmup_t) for s in cfg.param_scheduler] == [('TimmCosineLR', 10, 1)]
    assert cfg.train_dataloader.batch_size * 8 == 1024  # published batch on 8 GPUs
    assert cfg.train_dataloader.dataset.dataset.pipeline == dict(type='ProbeTrainTransform', size=size)
    assert cfg.heldout_dataloader.dataset.dataset.pipeline == dict(type='ProbeEvalTransform', size=size)
    assert cfg.test_cfg.pipeline == dict(type='ProbeEvalTransform', size=size)
    assert [s.name for s in cfg.test_cfg.sets] == ['IN-1K', 'ReaL', 'V2', 'A', 'R', 'Sketch']
    with torch.device('meta'):  # the real architecture, without its weights
        model = MODELS.build(cfg.model)
    head = model.heads[0]
    assert (head.fc.in_features, head.fc.out_features, head.norm.eps, head.lr) == (dim, 1000, 1e-6, 0.1)
    assert model.backbone.depth == {'internvit_6b_224': 48, 'internvit_6b_448': 45, 'internvit_300m_448': 24}[preset]


class _Labels(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)


def test_published_config_trains_on_all_of_train_and_the_sweep_switch_holds_out():
    from mmengine.config import Config

    cfg = Config.fromfile(os.path.join(os.path.dirname(__file__), '..', 'configs', 'classification',
                                       'internvit_6b_224_linear_probe_in1k.py'))
    assert cfg.runner_type == 'ProbeRunner'
    base = _Labels(np.repeat(np.arange(1000), 100))  # 100 images per class

    def parts(config):
        config = copy.deepcopy(config)
        assert apply_sweep_switch(config) == 2
        return [HeldOutSplit(**{k: v for k, v in dict(loader.dataset, dataset=base).items() if k != 'type'})
                for loader in (config.train_dataloader, config.heldout_dataloader)]

    train, held = parts(cfg)  # published: one head, the whole IN-1K train split
    assert (train.sweep, len(train), len(held)) == (False, len(base), 0)
    cfg.merge_from_dict({'model.sweep': True})  # the one switch (--cfg-options model.sweep=True)
    train, held = parts(cfg)
    assert train.sweep and len(held) == 1000 and len(train) == len(base) - 1000  # 1% held out, stratified
    assert not set(train.indices.tolist()) & set(held.indices.tolist())
    cfg.merge_from_dict({'train_dataloader.dataset.fraction': 0.0, 'heldout_dataloader.dataset.fraction': 0.0})
    with pytest.raises(ValueError, match='never on an evaluation set|held-out training data'):
        parts(cfg)


def test_cached_sweep_config_trains_heads_from_the_cache():
    from mmengine.config import Config

    cfg = Config.fromfile(os.path.join(os.path.dirname(__file__), '..', 'configs', 'classification',
                                       'internvit_6b_224_linear_probe_sweep_cached_in1k.py'))
    assert cfg.model.sweep is True and cfg.model.backbone.preset == 'internvit_6b_224'
    for loader in (cfg.train_dataloader, cfg.heldout_dataloader):
        split, cached = loader.dataset, loader.dataset.dataset
        assert split.type == 'HeldOutSplit' and cached.type == 'CachedFeatures' and cached.layers == 4
        assert cached.dataset.pipeline == dict(type='ProbeEvalTransform', size=224)
    assert cfg.train_dataloader.dataset.dataset.cache_dir == cfg.heldout_dataloader.dataset.dataset.cache_dir
    assert cfg.val_dataloader.dataset.type == 'CachedFeatures'
