"""Linear probes end to end on a synthetic ImageNet with a tiny random InternViT: tools/train.py (one process and
two gloo processes under torchrun), the one-pass sweep from the feature cache, and tools/test.py over every set."""
import copy
import csv
import glob
import json
import os
import os.path as osp
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

from classification import ImageNetFolder, LinearProbe, probe_record, stratified_holdout

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(REPO, 'configs', 'classification', 'internvit_tiny_linear_probe_synthetic.py')
CACHED_SWEEP_CONFIG = osp.join(REPO, 'configs', 'classification',
                               'internvit_tiny_linear_probe_sweep_cached_synthetic.py')
CLASSES = 6  # chance is 16.7 %
# No augmentation, so one process with batch 6 and two with batch 3 see the same images in the same steps.
NO_AUGMENTATION = ['train_dataloader.dataset.dataset.pipeline.type=ProbeEvalTransform', 'model.mixup=None']


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """A folder holding data/synthetic_imagenet (the configs' relative data root) and the runs' work dirs."""
    root = tmp_path_factory.mktemp('probe')
    make = runpy.run_path(osp.join(REPO, 'tools', 'make_synthetic_imagenet.py'))['main']
    make([str(root / 'data' / 'synthetic_imagenet'), '--classes', str(CLASSES), '--train-per-class', '24',
          '--val-per-class', '6', '--variant-per-class', '3', '--subset-classes', '3', '--size', '64'])
    return root


@pytest.fixture(autouse=True)
def in_workspace(workspace, monkeypatch, one_thread):
    monkeypatch.chdir(workspace)
    monkeypatch.setenv('INTERNVIT_CACHE_DIR', str(workspace / 'hash_cache'))


def subprocess_env(workspace):
    return dict(os.environ, OMP_NUM_THREADS='1', INTERNVIT_CACHE_DIR=str(workspace / 'hash_cache'),
                PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))


def train_in_process(config, work_dir, *options, resume=False):
    main = runpy.run_path(osp.join(REPO, 'tools', 'train.py'))['main']
    return main([config, '--work-dir', str(work_dir), *(['--resume'] if resume else []), '--cfg-options',
                 f'model.num_classes={CLASSES}', f'experiment_name={osp.basename(work_dir)}{int(resume)}', *options])


def last_val_metrics(work_dir):
    scalars = sorted(glob.glob(str(work_dir / '*' / 'vis_data' / 'scalars.json')))[-1]
    return [json.loads(line) for line in open(scalars) if 'num_scored' in line][-1]


def heads_of(checkpoint):
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)['state_dict']
    return {k: v for k, v in state.items() if k.startswith('heads.')}, state


def test_published_recipe_learns_and_one_command_evaluates_every_set(workspace):
    work_dir = workspace / 'published'
    subprocess.run([sys.executable, osp.join(REPO, 'tools', 'train.py'), CONFIG, '--work-dir', str(work_dir),
                    '--cfg-options', f'model.num_classes={CLASSES}'], cwd=workspace, env=subprocess_env(workspace),
                   check=True, capture_output=True, text=True, timeout=300)
    checkpoint = work_dir / 'epoch_4.pth'
    heads, state = heads_of(checkpoint)
    assert not [k for k in state if k.startswith('backbone.')] and heads
    assert len(probe_record(state)['backbone']['sha256']) == 64
    assert os.path.getsize(checkpoint) < 200_000  # heads + BN (+ optimizer state), not the backbone
    # The single published head trains on all of train (144 images, batch 16: 9 iterations per epoch) and
    # holds nothing out: there is no head to choose.
    assert not (work_dir / 'heldout_selection.json').exists()
    # best epoch of the plain head and of its EMA copy kept beside the last; both reported
    summary = json.load(open(work_dir / 'best_and_last.json'))
    assert set(summary) == {'top1', 'ema_top1'} and summary['top1']['last_epoch'] == 4
    for key in ('top1', 'ema_top1'):
        assert summary[key]['best'] >= summary[key]['last']
        assert glob.glob(str(work_dir / f"best_{key}_epoch_{summary[key]['best_epoch']}.pth"))
    scalars = sorted(glob.glob(str(work_dir / '*' / 'vis_data' / 'scalars.json')))[-1]
    assert max(json.loads(line).get('iter', 0) for line in open(scalars)) == 4 * 9  # (with 30 held out: 4 * 8)

    test_main = runpy.run_path(osp.join(REPO, 'tools', 'test.py'))['main']
    metrics = test_main([CONFIG, str(checkpoint), '--work-dir', str(work_dir), '--cfg-options',
                         f'model.num_classes={CLASSES}', 'experiment_name=published_test'])
    for name in ('IN-1K', 'ReaL', 'V2', 'A', 'R', 'Sketch'):
        assert f'{name}/top1' in metrics
    assert metrics['IN-1K/top1'] >= 60.0, metrics  # chance: 16.7
    assert metrics['V2/top1'] >= 50.0 and metrics['Sketch/top1'] >= 40.0, metrics
    assert metrics['A/num_scored'] == metrics['R/num_scored'] == 9  # 3 classes x 3 images
    assert metrics['A/num_classes'] == metrics['R/num_classes'] == 3  # logits restricted to the folders' classes
    assert metrics['IN-1K/num_classes'] == metrics['Sketch/num_classes'] == CLASSES
    assert metrics['ReaL/num_scored'] == 29  # 36 val images, every fifth unlabeled
    log = sorted(glob.glob(str(work_dir / '*' / '*.log')))[-1]
    text = open(log).read()
    assert '| tiny InternViT linear probe (synthetic) | IN-1K | ReaL | V2 | A | R | Sketch |' in text
    assert f"| top-1 | {metrics['IN-1K/top1']:.2f} | {metrics['ReaL/top1']:.2f} |" in text


def test_two_gloo_processes_agree_with_one(workspace):
    # Validation on the ReaL labels, so its multi-label accuracy is gathered across the two ranks as well.
    real_val = ['val_dataloader.dataset.type=ImageNetReaL', 'val_evaluator.real=True',
                'val_dataloader.dataset.real_json=data/synthetic_imagenet/real.json']
    options = [*NO_AUGMENTATION, *real_val, 'train_cfg.max_epochs=2']
    ddp_dir, single_dir = workspace / 'ddp', workspace / 'single'
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         osp.join(REPO, 'tools', 'train.py'), CONFIG, '--launcher', 'pytorch', '--work-dir', str(ddp_dir),
         '--cfg-options', f'model.num_classes={CLASSES}', 'train_dataloader.batch_size=3', *options],
        cwd=workspace, env=subprocess_env(workspace), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'terminate called' not in result.stderr  # no SIGABRT at exit (run_safety.finish_run)
    train_in_process(CONFIG, single_dir, 'train_dataloader.batch_size=6', *options)
    ddp, _ = heads_of(ddp_dir / 'epoch_2.pth')
    single, _ = heads_of(single_dir / 'epoch_2.pth')
    assert ddp.keys() == single.keys()
    moved = (single['heads.0.fc.weight'] - torch.load(single_dir / 'epoch_1.pth', weights_only=False)[
        'state_dict']['heads.0.fc.weight']).abs().max()
    assert moved > 1e-3  # the comparison below is between heads that trained
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    ddp_val, single_val = last_val_metrics(ddp_dir), last_val_metrics(single_dir)
    assert ddp_val['num_scored'] == single_val['num_scored'] == 29  # labeled ReaL images, each counted once
    assert ddp_val['top1'] == pytest.approx(single_val['top1'])


def test_cached_sweep_chooses_on_heldout_data_and_resumes_from_the_cache(workspace, monkeypatch, capfd):
    grid = ['model.sweep_lrs=[0.0001,0.1,3.0]', "model.sweep_features=['cls_mean','cls']", 'train_cfg.max_epochs=3']
    trained_on = set()  # dataset indices of every training batch
    train_step = LinearProbe.train_step

    def recording_train_step(self, data, optim_wrapper):
        trained_on.update(data['data_samples']['indices'].tolist())
        return train_step(self, data, optim_wrapper)

    with monkeypatch.context() as patch:
        patch.setattr(LinearProbe, 'train_step', recording_train_step)
        runner = train_in_process(CACHED_SWEEP_CONFIG, workspace / 'sweep', *grid)
    # The backbone ran once per image: 144 train (incl. 30 held out) + 36 val, for 6 heads over 3 epochs.
    assert runner.model.backbone_images_processed == 144 + 36
    shown = capfd.readouterr().out  # the extraction's progress bar: images done of the total, with an ETA
    assert '] 144/144, ' in shown and '] 36/36, ' in shown and 'ETA:' in shown
    selection = json.loads((workspace / 'sweep' / 'heldout_selection.json').read_text())
    assert selection['heldout_size'] == 30 and selection['epoch'] == 3
    # The grid for a person: features x lrs as CSV (its maximum is the chosen head's score) and a PNG heat map.
    with open(workspace / 'sweep' / 'heldout_grid.csv', newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['feature', '0.0001', '0.1', '3'] and [r[0] for r in rows[1:]] == ['cls_mean', 'cls']
    cells = {(r[0], lr): float(v) for r in rows[1:] for lr, v in zip(rows[0][1:], r[1:])}
    chosen = next(h for h in selection['heads'] if h['name'] == selection['selected'])
    assert max(cells.values()) == pytest.approx(chosen['heldout_top1'], abs=1e-4)
    assert cells[(chosen['feature'], f"{chosen['lr']:g}")] == pytest.approx(chosen['heldout_top1'], abs=1e-4)
    assert (workspace / 'sweep' / 'heldout_grid.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    # The held-out images (20 % per class, seed 0; computed here from the labels) never reached a training step,
    # and every other train image did.
    train_set = ImageNetFolder('data/synthetic_imagenet/train', dict(type='ProbeEvalTransform', size=56),
                               classes='data/synthetic_imagenet/classes.txt')
    labels = np.asarray(train_set.labels)
    held = stratified_holdout(labels, 0.2, seed=0)
    assert len(held) == 30 and not trained_on & set(held.tolist())
    assert trained_on | set(held.tolist()) == set(range(144))

    # Scores recomputed from the saved epoch-3 heads on the held-out features: the choice is their argmax.
    _, state = heads_of(workspace / 'sweep' / 'epoch_3.pth')
    probe = copy.deepcopy(runner.model).eval()
    probe.load_state_dict(state)
    cache = 'work_dirs/feature_cache/internvit_tiny_synthetic/in1k_train'
    features = np.concatenate([np.load(f) for f in sorted(glob.glob(f'{cache}/shard_*.npy'))])
    with torch.no_grad():
        predictions = probe.head_logits(torch.from_numpy(features[held]).float()).argmax(-1)
    scores = (100.0 * (predictions == torch.from_numpy(labels[held])).double().mean(1)).tolist()
    assert [h['heldout_top1'] for h in selection['heads']] == pytest.approx(scores, abs=1e-3)
    best = scores.index(max(scores))
    assert selection['selected'] == selection['heads'][best]['name'] == runner.model.heads[best].name
    assert int(runner.model.selected_head) == best
    assert int(state['selected_head']) == best
    assert probe_record(state)['selection']['selected'] == selection['selected']
    tiny_lr = [h['heldout_top1'] for h in selection['heads'] if h['lr'] == 0.0001]
    assert max(tiny_lr) < max(scores) - 20  # the grid matters: a too-small lr barely learns in 3 epochs

    # --resume continues the probe from its own checkpoint (heads, optimizer, selection), features from the cache.
    resumed = train_in_process(CACHED_SWEEP_CONFIG, workspace / 'sweep', *grid[:2], 'train_cfg.max_epochs=4',
                               resume=True)
    assert resumed.model.backbone_images_processed == 0
    assert json.loads((workspace / 'sweep' / 'heldout_selection.json').read_text())['epoch'] == 4
    assert (workspace / 'sweep' / 'epoch_4.pth').is_file()


def test_two_gloo_processes_share_the_feature_extraction(workspace):
    def cache_options(root):
        return [f'train_dataloader.dataset.dataset.cache_dir={root}/in1k_train',
                f'heldout_dataloader.dataset.dataset.cache_dir={root}/in1k_train',
                f'val_dataloader.dataset.cache_dir={root}/in1k_val', 'train_cfg.max_epochs=1']

    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         osp.join(REPO, 'tools', 'train.py'), CACHED_SWEEP_CONFIG, '--launcher', 'pytorch', '--work-dir',
         str(workspace / 'ddp_cached'), '--cfg-options', f'model.num_classes={CLASSES}',
         'train_dataloader.batch_size=8', *cache_options('ddp_cache')],
        cwd=workspace, env=subprocess_env(workspace), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'terminate called' not in result.stderr  # no SIGABRT at exit (run_safety.finish_run)
    log = sorted(glob.glob(str(workspace / 'ddp_cached' / '*' / '*.log')))[-1]
    assert 'in1k_train: rank 0 extracts 2 of 3 shards' in open(log).read()  # rank 1 took the third
    train_in_process(CACHED_SWEEP_CONFIG, workspace / 'one_cached', 'train_dataloader.batch_size=16',
                     *cache_options('one_cache'))
    for split, shards in (('in1k_train', 3), ('in1k_val', 1)):
        two, one = workspace / 'ddp_cache' / split, workspace / 'one_cache' / split
        two_manifest, one_manifest = (json.loads((d / 'manifest.json').read_text()) for d in (two, one))
        two_manifest.pop('info'), one_manifest.pop('info')  # creation time and weights path
        assert two_manifest == one_manifest
        for shard in range(shards):
            name = f'shard_{shard:05d}.npy'
            np.testing.assert_allclose(np.load(two / name), np.load(one / name), rtol=1e-5, atol=1e-6)


def test_tools_test_evaluates_the_published_head_file_and_reports_a_missing_set(workspace, tmp_path):
    """tools/test.py CONFIG <published head file>: the head loads strictly and the table's numbers are the ones
    recomputed here from the logits (independently of the probe code); a missing set does not stop the others."""
    import sys as _sys
    import types

    import torch.nn.functional as F

    from backbones import InternViT
    from classification import MissingEvaluationSetError, ProbeEvalTransform
    from classification.datasets import load_image
    from classification.model import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(7)
    backbone = InternViT('internvit_tiny')
    weights = tmp_path / 'tiny_backbone.pth'
    torch.save(backbone.state_dict(), weights)
    g = torch.Generator().manual_seed(3)
    head = {'norm.weight': torch.rand(128, generator=g) + 0.5, 'norm.bias': torch.randn(128, generator=g),
            'norm.running_mean': torch.randn(128, generator=g), 'norm.running_var': torch.rand(128, generator=g) + 0.5,
            'norm.num_batches_tracked': torch.tensor(100), 'head.weight': torch.randn(CLASSES, 128, generator=g),
            'head.bias': torch.randn(CLASSES, generator=g)}
    yacs = types.ModuleType('yacs.config')

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__, yacs.CfgNode = 'yacs.config', 'CfgNode', CfgNode
    _sys.modules.update({'yacs': types.ModuleType('yacs'), 'yacs.config': yacs})
    try:  # the published trainer's file: the head beside its yacs config (never unpickled when read)
        torch.save(dict(model=head, config=CfgNode(BASE_LR=0.2), epoch=8, max_accuracy=88.23), tmp_path / 'head.pth')
    finally:
        del _sys.modules['yacs'], _sys.modules['yacs.config']

    # Independent reference on the synthetic IN-1K val: eval transform, normalization, backbone, BN, Linear.
    transform = ProbeEvalTransform(size=56)
    val = sorted(glob.glob(str(workspace / 'data' / 'synthetic_imagenet' / 'val' / '*' / '*')))
    classes = [c.split()[0] for c in open(workspace / 'data' / 'synthetic_imagenet' / 'classes.txt') if c.strip()]
    images = torch.stack([transform(load_image(p)) for p in val]).float()
    images = (images / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = backbone.forward_features(images)
        x = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1)
        x = F.batch_norm(x, head['norm.running_mean'], head['norm.running_var'], head['norm.weight'],
                         head['norm.bias'], training=False, eps=1e-6)
        logits = F.linear(x, head['head.weight'], head['head.bias'])
    labels = torch.tensor([classes.index(osp.basename(osp.dirname(p))) for p in val])
    top1 = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    top5 = 100.0 * (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item()

    test_main = runpy.run_path(osp.join(REPO, 'tools', 'test.py'))['main']
    options = [f'model.num_classes={CLASSES}', f'model.backbone.pretrained={weights}', 'experiment_name=published_head']
    metrics = test_main([CONFIG, str(tmp_path / 'head.pth'), '--work-dir', str(tmp_path / 'run'), '--cfg-options',
                         *options, "test_cfg.only=['IN-1K','Sketch']"])
    assert metrics['IN-1K/top1'] == pytest.approx(top1) and metrics['IN-1K/top5'] == pytest.approx(top5)
    assert metrics['IN-1K/num_scored'] == len(val) and 'IN-1K/ema_top1' not in metrics  # the file has no EMA head

    with pytest.raises(MissingEvaluationSetError, match='(?s)V2: .*no_such_folder does not exist') as err:
        test_main([CONFIG, str(tmp_path / 'head.pth'), '--work-dir', str(tmp_path / 'run'), '--cfg-options',
                   *options, 'experiment_name=published_head_missing', "test_cfg.only=['IN-1K','V2','Sketch']",
                   'test_cfg.sets.2.dataset.root=no_such_folder'])
    assert '1 of 3 test sets' in str(err.value)
    text = [open(f).read() for f in glob.glob(str(tmp_path / 'run' / '*' / '*.log'))]
    text = next(t for t in text if 'test set V2 is missing' in t)
    assert f"| top-1 | {metrics['IN-1K/top1']:.2f} | - | {metrics['Sketch/top1']:.2f} |" in text  # the others ran
