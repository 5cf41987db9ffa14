"""The ecosystem's usual entry points: transformers (native export, AutoModel), timm's registry and state dicts,
hub ids, MMSeg's inference API and demo, result files. CPU, tiny models, no network."""
import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from backbones.internvit import InternViT
from backbones.layouts import from_canonical
from backbones.run_config import arch_from_backbone_config, backbone_config_from_text

from helpers import randomized

REPO = Path(__file__).resolve().parents[1]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_checkpoint(path, model, backbone_cfg):
    """An MMEngine training checkpoint as a run writes it: backbone.* tensors + meta.cfg, the run's config text."""
    cfg_text = f"model = dict(type='EncoderDecoder', backbone={backbone_cfg}, decode_head=dict(type='FCNHead'))\n"
    torch.save({'meta': {'cfg': cfg_text, 'iter': 8}, 'state_dict': from_canonical(model.state_dict(), 'hf',
                                                                                     'backbone.')}, path)
    return path


# --------------------------------------------------------------------------------------------- transformers export
def test_export_native_loads_with_automodel_and_heads_come_from_the_run_config(tmp_path, capsys):
    """--format native: transformers.AutoModel (no remote code) loads OUT and computes our outputs; the number of
    heads (2 here, not the tiny preset's 4) comes from the checkpoint's meta.cfg, no --num-heads."""
    from transformers import AutoModel, InternVLVisionModel
    model = randomized('internvit_tiny', num_heads=2)
    src = run_checkpoint(tmp_path / 'iter_8.pth', model, "dict(type='InternViT', preset='internvit_tiny', "
                                                         "num_heads=2, out_indices=[3])")
    tool = load_tool('export_to_chat')
    out = tmp_path / 'native'
    assert tool.main([str(src), str(out), '--format', 'native', '--image-size', '56', '--dtype', 'float32',
                      '--verify']) == 0
    printed = capsys.readouterr().out
    assert 'verify: relative difference' in printed and 'within the tolerance 0.0001' in printed
    theirs = AutoModel.from_pretrained(str(out)).eval()
    assert type(theirs) is InternVLVisionModel and theirs.config.num_attention_heads == 2
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=x).last_hidden_state, model.forward_features(x),
                                   rtol=0, atol=1e-5)


def test_export_verify_fails_beyond_the_tolerance(tmp_path, capsys):
    model = randomized('internvit_tiny')
    src = run_checkpoint(tmp_path / 'iter_8.pth', model, "dict(type='InternViT', preset='internvit_tiny')")
    tool = load_tool('export_to_chat')
    # bf16 storage moves the outputs by ~1e-3 relative: within the default 5e-2, beyond a 1e-6 bound
    assert tool.main([str(src), str(tmp_path / 'a'), '--format', 'native', '--image-size', '56', '--verify']) == 0
    relative = float(re.search(r'relative difference (\S+) within the tolerance 0.05', capsys.readouterr().out)[1])
    assert 1e-5 < relative < 5e-2
    assert tool.main([str(src), str(tmp_path / 'b'), '--image-size', '56', '--verify', '--tolerance', '1e-6']) == 1
    captured = capsys.readouterr()
    assert 'EXCEEDS the tolerance 1e-06' in captured.out
    assert re.search(r'does not reproduce the source model \(relative difference \S+ > --tolerance 1e-06\)',
                     captured.err)
    # --format native has no meaning for a copy of a chat model
    assert tool.main([str(src), str(tmp_path / 'c'), '--format', 'native', '--into-chat', str(tmp_path)]) == 2


def test_run_config_text_is_parsed_never_executed(tmp_path):
    marker = tmp_path / 'executed'
    text = (f"import os\nmarker = open({str(marker)!r}, 'w')\n"
            f"model = dict(type='EncoderDecoder', backbone=dict(type='InternViT', preset='internvit_6b_448', "
            f"depth=48, pretrained=os.path.join('a', 'b'), drop_path_rate=-0.0, out_indices=[11, -1]))\n")
    backbone = backbone_config_from_text(text)
    assert not marker.exists()
    assert backbone == {'type': 'InternViT', 'preset': 'internvit_6b_448', 'depth': 48, 'drop_path_rate': -0.0,
                        'out_indices': [11, -1]}  # the call expression is left out, not run
    arch = arch_from_backbone_config(backbone)
    assert (arch.depth, arch.num_heads, arch.embed_dim) == (48, 25, 3200)
    assert backbone_config_from_text('model = dict(type="EncoderDecoder")') is None
    assert backbone_config_from_text('not python (') is None


# --------------------------------------------------------------------------------------------- timm
def test_timm_create_model_returns_the_project_backbone():
    import timm

    import backbones  # noqa: F401  (registers the presets)
    assert {'internvit_6b_224', 'internvit_6b_448', 'internvit_300m_448'} <= set(timm.list_models('internvit*'))
    with torch.device('meta'):
        model = timm.create_model('internvit_6b_224')
        model_448 = timm.create_model('internvit_6b_448', depth=48, img_size=504)
    assert type(model) is InternViT and sum(p.numel() for p in model.parameters()) == 5_902_793_600
    assert (model_448.arch.depth, model_448.arch.img_size, model_448.arch.num_heads) == (48, 504, 25)
    tiny = timm.create_model('internvit_tiny', img_size=112, out_indices=[1, 3])
    assert tiny.forward_features(torch.zeros(1, 3, 112, 112)).shape == (1, 65, 64)
    with pytest.raises(ValueError, match='internvit_tiny: InternViT has no classifier head'):
        timm.create_model('internvit_tiny', num_classes=10)


def test_timm_vit_intern300m_state_dict_loads_into_internvit_300m(tmp_path):
    """timm's own VisionTransformer class for vit_intern300m_patch14_448 (2 of its 24 blocks, random weights, no
    download): its state dict loads strictly into internvit_300m_448 and computes timm's features."""
    import timm
    theirs = timm.create_model('vit_intern300m_patch14_448', pretrained=False, depth=2, img_size=224).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():  # layer scales and biases away from their init values
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    torch.save(theirs.state_dict(), tmp_path / 'timm_intern300m.pth')
    ours = timm.create_model('internvit_300m_448', pretrained=str(tmp_path / 'timm_intern300m.pth'), depth=2,
                             img_size=224).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------- hub ids
def fake_hub_cache(cache, repo_id, write):
    """huggingface_hub's cache layout for one repo at one commit: models--OWNER--NAME/{refs/main,snapshots/SHA/}."""
    sha = '0123456789abcdef0123456789abcdef01234567'
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(sha)
    write(repo / 'snapshots' / sha)
    return repo / 'snapshots' / sha


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants
    cache = tmp_path / 'hf_cache'
    cache.mkdir()
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    return cache


def test_hub_ids_resolve_through_the_cache_offline(offline_hub):
    import timm

    from backbones.arch_config import hf_config_from_arch  # noqa: F401
    from backbones.writing import write_hf
    model = randomized('internvit_tiny', seed=5)
    fake_hub_cache(offline_hub, 'OpenGVLab/InternViT-tiny-test',
                   lambda d: write_hf(model.state_dict(), model.arch, d, image_size=56, dtype=torch.float32))
    x = torch.randn(1, 3, 56, 56)
    expected = model.forward_features(x)
    for loaded in (InternViT.from_pretrained('OpenGVLab/InternViT-tiny-test'),  # from_pretrained
                   InternViT('internvit_tiny', pretrained='OpenGVLab/InternViT-tiny-test'),  # configs' pretrained=
                   timm.create_model('internvit_tiny', pretrained='OpenGVLab/InternViT-tiny-test')):
        torch.testing.assert_close(loaded.eval().forward_features(x), expected, rtol=0, atol=1e-6)


def test_missing_hub_id_names_the_download_command(offline_hub, tmp_path, monkeypatch):
    from chat import load_chat_model
    missing = r'checkpoint OpenGVLab/InternViT-6B-448px-V1-5 is not a local path.*HF_HUB_OFFLINE is set.*'
    with pytest.raises(FileNotFoundError, match=missing + r'hf download OpenGVLab/InternViT-6B-448px-V1-5'):
        InternViT.from_pretrained('OpenGVLab/InternViT-6B-448px-V1-5')
    with pytest.raises(FileNotFoundError, match=r'chat checkpoint directory OpenGVLab/InternVL-Chat-V1-5 is not a '
                                                r'local path.*hf download OpenGVLab/InternVL-Chat-V1-5'):
        load_chat_model('OpenGVLab/InternVL-Chat-V1-5')
    with pytest.raises(FileNotFoundError, match=r'hf download OpenGVLab/InternViT-300M-448px --revision v1'):
        InternViT('internvit_tiny', pretrained='OpenGVLab/InternViT-300M-448px@v1')
    # a local path that exists wins over a hub id of the same spelling; one that does not is still named as a path
    monkeypatch.chdir(tmp_path)
    model = randomized('internvit_tiny')
    from backbones.writing import write_hf
    write_hf(model.state_dict(), model.arch, tmp_path / 'local' / 'vit', image_size=56)
    assert InternViT.from_pretrained('local/vit').depth == 4
    with pytest.raises(FileNotFoundError, match=r'^checkpoint ./missing.pth does not exist$'):
        InternViT.from_pretrained('./missing.pth')


# --------------------------------------------------------------------------------------------- mmseg inference
@pytest.fixture(scope='module')
def seg_checkpoint(tmp_path_factory):
    """A tiny data set and a random-weight checkpoint of the quick-start segmentor (as a run would save it)."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    from segmentation.testing import QUICKSTART_CONFIG, make_tiny_dataset
    root = tmp_path_factory.mktemp('seg_api')
    data_root = make_tiny_dataset(str(root / 'synth'), num_train=1, num_val=2, size=112)
    cfg = Config.fromfile(QUICKSTART_CONFIG)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg.model)
    model.init_weights()
    checkpoint = root / 'iter_1.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {'dataset_meta': {
        'classes': ['sky', 'grass', 'water', 'sand', 'brick'], 'palette': [[0, 0, 255], [0, 255, 0], [255, 0, 0],
                                                                         [255, 255, 0], [128, 64, 0]]}}}, checkpoint)
    images = sorted(str(p) for p in Path(data_root, 'images', 'validation').glob('*.jpg'))
    return QUICKSTART_CONFIG, str(checkpoint), data_root, images


def test_mmseg_init_model_inference_model_inferencer_and_image_demo(seg_checkpoint, tmp_path):
    import mmcv
    from mmseg.apis import MMSegInferencer, inference_model, init_model
    config, checkpoint, _, images = seg_checkpoint
    model = init_model(config, checkpoint, device='cpu')
    result = inference_model(model, images[0])
    labels = result.pred_sem_seg.data[0].numpy()
    height, width = mmcv.imread(images[0]).shape[:2]
    assert labels.shape == (height, width)
    inferencer = MMSegInferencer(model=config, weights=checkpoint, device='cpu')
    assert (inferencer(images[0], return_datasamples=True).pred_sem_seg.data[0].numpy() == labels).all()

    out = tmp_path / 'demo'
    load_tool('image_demo').main([config, checkpoint, *images, '--out', str(out), '--opacity', '0.6'])
    name = Path(images[0]).stem
    assert (mmcv.imread(str(out / f'{name}_labels.png'), flag='unchanged') == labels).all()
    overlay = mmcv.imread(str(out / f'{name}.png'))
    assert overlay.shape == (height, width, 3) and not (overlay == mmcv.imread(images[0])).all()
    with pytest.raises(FileExistsError, match=f'{name}.png exists'):
        load_tool('image_demo').main([config, checkpoint, images[0], '--out', str(out)])


def test_test_py_tta_and_out(seg_checkpoint, tmp_path, monkeypatch):
    """--tta runs every image through 6 scales x 2 flips (12 predictions merged by SegTTAModel); --out writes the
    label maps."""
    import mmcv
    from mmseg.models import EncoderDecoder
    config, checkpoint, data_root, images = seg_checkpoint
    calls = []
    predict = EncoderDecoder.predict
    monkeypatch.setattr(EncoderDecoder, 'predict', lambda self, inputs, samples=None: (
        calls.append(len(inputs)), predict(self, inputs, samples))[1])
    options = ['--cfg-options', f'test_dataloader.dataset.data_root={data_root}', 'test_dataloader.num_workers=0',
               'test_dataloader.persistent_workers=False']
    tool = load_tool('test')
    metrics = tool.main([config, checkpoint, '--work-dir', str(tmp_path / 'plain'), '--out', str(tmp_path / 'out'),
                         *options])
    assert sum(calls) == len(images) and 'mIoU' in metrics
    for image in images:
        labels = mmcv.imread(str(tmp_path / 'out' / f'{Path(image).stem}.png'), flag='unchanged')
        assert labels.shape == mmcv.imread(image).shape[:2]
    calls.clear()
    metrics = tool.main([config, checkpoint, '--work-dir', str(tmp_path / 'tta'), '--tta', *options])
    assert sum(calls) == 12 * len(images) and 'mIoU' in metrics


# --------------------------------------------------------------------------------------------- results to look at
def test_tiny_run_writes_per_class_tables_best_checkpoint_curves_and_ties_the_schedule(tmp_path):
    """tools/train.py, 4 iterations with validation at 2 and 4: per-class CSV/JSON next to the log, the best
    checkpoint kept (save_best), the quick start's PolyLR ending at the changed max_iters, tools/plot_logs.py."""
    import csv
    import os
    import subprocess

    import mmcv

    from segmentation.testing import QUICKSTART_CONFIG, as_cli, make_tiny_dataset, tiny_run_options
    data_root = make_tiny_dataset(str(tmp_path / 'synth'), num_train=4, num_val=2, size=112)
    work = tmp_path / 'run'
    options = as_cli(tiny_run_options(data_root, 4, batch_size=2, **{
        'train_cfg.val_interval': 2, 'param_scheduler.0.end': 2, 'param_scheduler.1.begin': 2}))
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'train.py'), QUICKSTART_CONFIG, '--work-dir',
                           str(work), '--cfg-options', *options], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore'), timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert 'PolyLR: end 300 -> 4 (follows train_cfg.max_iters)' in log
    dumped = (work / 'quickstart_tiny_upernet_synthetic.py').read_text()
    assert re.search(r"type='PolyLR'\)", dumped) and re.search(r'end=4,\s*eta_min', dumped)
    assert list(work.glob('best_mIoU_iter_*.pth'))

    run_dir = next(p for p in work.iterdir() if p.is_dir() and (p / 'vis_data').is_dir())
    with open(run_dir / 'per_class_results.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['class'] for r in rows] == ['sky', 'grass', 'water', 'sand', 'brick'] and set(rows[0]) == {
        'class', 'IoU', 'Acc'}
    record = json.loads((run_dir / 'per_class_results.json').read_text())
    assert record['iter'] == 4 and [r['class'] for r in record['per_class']] == [r['class'] for r in rows]
    logged_miou = float(re.findall(r'Iter\(val\) \[\d+/\d+\]\s+aAcc: \S+\s+mIoU: (\S+)', log)[-1])
    ious = [float(r['IoU']) for r in rows if r['IoU'] != 'nan']
    assert record['metrics']['mIoU'] == pytest.approx(logged_miou) == pytest.approx(sum(ious) / len(ious), abs=0.01)

    out = load_tool('plot_logs').main([str(work), '--out', str(tmp_path / 'curves.png')])
    image = mmcv.imread(out)
    assert image.shape[0] > 400 and image.shape[2] == 3 and image.std() > 1
    with pytest.raises(KeyError, match=r'has no accuracy_top1; it has: .*loss'):
        load_tool('plot_logs').main([str(work), '--keys', 'accuracy_top1'])


def test_tensorboard_switch_writes_event_files(tmp_path):
    """The documented switch: TensorboardVisBackend beside LocalVisBackend (optional extra `tensorboard`)."""
    pytest.importorskip('tensorboard')
    from mmengine.config import Config
    from mmseg.registry import VISUALIZERS

    from segmentation.testing import QUICKSTART_CONFIG
    config = tmp_path / 'tb.py'
    config.write_text(f"_base_ = [{QUICKSTART_CONFIG!r}]\n"
                      f"visualizer = dict(vis_backends=[dict(type='LocalVisBackend'), "
                      f"dict(type='TensorboardVisBackend')])\n")
    cfg = Config.fromfile(str(config))
    visualizer = VISUALIZERS.build(dict(cfg.visualizer, name='tb_test', save_dir=str(tmp_path / 'vis')))
    visualizer.add_scalars({'loss': 1.5}, step=1)
    visualizer.close()
    assert list((tmp_path / 'vis').rglob('events.out.tfevents.*'))
    assert (tmp_path / 'vis' / 'vis_data' / 'scalars.json').is_file()


# --------------------------------------------------------------------------------------------- Slurm
FAKE_SRUN = r'''#!/usr/bin/env bash
# srun stand-in: records its arguments, starts --ntasks copies of the command with Slurm's variables set
echo "$@" > "$SRUN_LOG"
n=1
while [ $# -gt 0 ]; do
    case $1 in --ntasks=*) n=${1#--ntasks=}; shift;; -p) shift 2;; --*) shift;; *) break;; esac
done
pids=()
for ((i = 0; i < n; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=$n SLURM_NODELIST=127.0.0.1 "$@" > "$SRUN_LOG.$i" 2>&1 &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
'''


def test_slurm_train_script_and_launcher_with_two_gloo_processes(tmp_path):
    import os
    import socket
    import subprocess

    from segmentation.testing import QUICKSTART_CONFIG, as_cli, make_tiny_dataset, tiny_run_options
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'srun').write_text(FAKE_SRUN)
    (bin_dir / 'srun').chmod(0o755)
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    data_root = make_tiny_dataset(str(tmp_path / 'synth'), num_train=4, num_val=1, size=112)
    options = as_cli(tiny_run_options(data_root, 2, batch_size=2, **{'param_scheduler.0.end': 1,
                                                                      'param_scheduler.1.begin': 1}))
    log_file = tmp_path / 'srun.log'
    env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'MASTER_', 'RANK', 'WORLD_SIZE'))}
    env.update(PATH=f'{bin_dir}:{env["PATH"]}', SRUN_LOG=str(log_file), MASTER_PORT=str(port), OMP_NUM_THREADS='1',
               PYTHON=sys.executable, PYTHONWARNINGS='ignore', GPUS_PER_NODE='2')
    proc = subprocess.run(['bash', str(REPO / 'tools' / 'slurm_train.sh'), 'debug', 'tiny', QUICKSTART_CONFIG, '2',
                           '--work-dir', str(tmp_path / 'work'), '--cfg-options', *options],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    rank0 = (tmp_path / 'srun.log.0').read_text()
    assert proc.returncode == 0, rank0[-3000:] + (tmp_path / 'srun.log.1').read_text()[-2000:]
    assert log_file.read_text().startswith('-p debug --job-name=tiny --gres=gpu:2 --ntasks=2 --ntasks-per-node=2')
    assert 'Distributed launcher: slurm' in rank0 and 'GPU number: 2' in rank0  # MMEngine's name for world size
    assert 'Iter(train) [2/2]' in rank0 and (tmp_path / 'work' / 'iter_2.pth').is_file()
    # outside srun the launcher says what is missing
    bad = subprocess.run([sys.executable, str(REPO / 'tools' / 'train.py'), QUICKSTART_CONFIG, '--launcher', 'slurm',
                          '--work-dir', str(tmp_path / 'bad')], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and '--launcher slurm needs SLURM_PROCID, SLURM_NTASKS, SLURM_NODELIST' in bad.stderr


# --------------------------------------------------------------------------------------------- noise and README
def test_no_mmcv_lite_deformable_attention_warning_and_placeholder_errors():
    import subprocess
    proc = subprocess.run([sys.executable, '-W', 'always', '-c', 'import mm_adapter, mmseg.models, mmcv.cnn'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'Fail to import ``MultiScaleDeformableAttention``' not in proc.stderr
    if getattr(sys.modules.get('mmcv.ops'), '__file__', '').endswith('compat.py'):  # the shim is in use here
        from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttention
        with pytest.raises(Exception, match='MultiScaleDeformableAttention'):
            MultiScaleDeformableAttention()


def test_readme_backbone_snippet_and_timm_keywords():
    model = randomized('internvit_tiny')
    images = torch.randn(2, 3, 56, 56)
    # README: maps = model.forward_intermediates(images, [11, 23, 35, -1], output_format='nchw')
    maps = model.forward_intermediates(images, [0, 1, 2, -1], output_format='nchw')
    assert all(isinstance(m, torch.Tensor) and m.shape == (2, 64, 4, 4) for m in maps)
    tokens = model.forward_features(images)
    torch.testing.assert_close(maps[-1], tokens[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4))
    # timm's names: output_fmt='NCHW' / 'NLC', indices=n for the last n layers, None for all
    timm_maps = model.forward_intermediates(images, indices=2, output_fmt='NCHW')
    assert len(timm_maps) == 2 and torch.equal(timm_maps[1], maps[-1]) and torch.equal(timm_maps[0], maps[2])
    nlc = model.forward_intermediates(images, output_fmt='NLC')
    assert len(nlc) == 4 and torch.equal(nlc[-1], tokens)  # tokens keep the cls token by default
    with pytest.raises(ValueError, match="output_format must be 'nchw' or 'tokens' \\(timm: 'NCHW', 'NLC'\\)"):
        model.forward_intermediates(images, output_fmt='NHWC')


def test_cpu_benchmark_defaults_to_float32(tmp_path):
    out = tmp_path / 'bench.jsonl'
    load_tool('benchmark_backbone').main(['--preset', 'internvit_tiny', '--img-size', '56', '--batch', '1',
                                          '--warmup', '1', '--iters', '1', '--device', 'cpu', '--json', str(out)])
    assert json.loads(out.read_text().splitlines()[-1])['dtype'] == 'float32'


def test_test_py_takes_the_sweep_switch_from_the_runs_dumped_config(tmp_path, capsys):
    from mmengine.config import Config
    config = REPO / 'configs' / 'classification' / 'internvit_tiny_linear_probe_synthetic.py'
    run = tmp_path / 'run'
    run.mkdir()
    (run / config.name).write_text("model = dict(type='LinearProbe', sweep=True, lr=0.1)\n")
    checkpoint = run / 'epoch_4.pth'
    cfg = Config.fromfile(str(config))
    assert cfg.model.sweep is False
    load_tool('test').sweep_of_the_run(cfg, str(config), str(checkpoint))
    assert cfg.model.sweep is True and 'model.sweep=True as in the run' in capsys.readouterr().out
    other = Config.fromfile(str(config))  # a checkpoint elsewhere: the config as given
    load_tool('test').sweep_of_the_run(other, str(config), str(tmp_path / 'epoch_4.pth'))
    assert other.model.sweep is False


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize('terminal', [True, False])
def test_export_shards_show_progress_on_a_terminal_only(tmp_path, monkeypatch, terminal):
    from backbones.writing import save_safetensors_shards
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, 'stderr', stderr)
    tensors = {f'w{i}': torch.zeros(256) for i in range(3)}  # 1 KiB each: three shards under a 1.5 KiB limit
    files = save_safetensors_shards(tensors, tmp_path, max_shard_bytes=1536)
    assert len(files) == 4  # three shards and the index
    shown = stderr.getvalue()
    if terminal:
        assert f'writing {tmp_path.name}: 100%' in shown and '3.07k/3.07k' in shown
    else:
        assert shown == ''
