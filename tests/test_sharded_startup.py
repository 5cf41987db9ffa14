"""Sharded start-up: InternViT on the meta device, each rank writing only its shards from the checkpoint or the
replayed random initialisation (backbones.deferred_load, InternViTFSDPStrategy, InternViTDeepSpeedStrategy), gives
exactly the weights of an ordinary start-up."""
import os.path as osp
import runpy

import pytest
import torch
from safetensors.torch import save_file

from backbones import InternViT
from backbones.deferred_load import deferred_loading, materialize
from backbones.layouts import WeightsError, from_canonical
from segmentation.testing import QUICKSTART_CONFIG

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def materialize_all(model):
    for module in model.modules():
        materialize(module, 'cpu')
    return model


@pytest.mark.parametrize('layout, suffix', [('hf', '.safetensors'), ('original', '.pth'), ('native', '.safetensors')])
def test_deferred_backbone_loads_what_an_eager_load_loads(tmp_path, layout, suffix):
    torch.manual_seed(0)
    source = InternViT('internvit_tiny', depth=2, img_size=28)  # a 2x2 grid, resampled to 4x4 below
    state = from_canonical(source.state_dict(), layout, prefix='backbone.' if layout == 'original' else '')
    path = str(tmp_path / f'ckpt{suffix}')
    if suffix == '.safetensors':
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, path)
    else:
        torch.save({'state_dict': state}, path)
    eager = InternViT('internvit_tiny', depth=2, img_size=56, pretrained=path)
    with deferred_loading():
        deferred = InternViT('internvit_tiny', depth=2, img_size=56, pretrained=path)
    assert all(p.is_meta for p in deferred.parameters())
    materialize_all(deferred)
    expected = eager.state_dict()
    assert deferred.state_dict().keys() == expected.keys()
    for name, value in deferred.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_deferred_loading_checks_the_checkpoint_before_reading_it(tmp_path):
    path = str(tmp_path / 'short.safetensors')
    save_file(InternViT('internvit_tiny', depth=2).state_dict(), path)
    with deferred_loading(), pytest.raises(WeightsError, match='missing .*encoder.layers.2'):
        InternViT('internvit_tiny', depth=3, pretrained=path)


def test_materialize_refuses_a_meta_module_it_cannot_fill():
    with torch.device('meta'):
        layer = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match='Linear has tensors on the meta device .*weight.* nothing can fill them'):
        materialize(layer, 'cpu')


def test_fsdp_startup_on_two_ranks_equals_todays(tmp_path):
    """tools/benchmark_startup.py with the quick-start segmentor (neck, UperNet, aux head) on 2 gloo processes: the
    full state dict after FSDP wrapping is bit-identical between MMEngine's FSDPStrategy (full model on every rank)
    and InternViTFSDPStrategy (backbone deferred; its 56-px checkpoint resampled to the 112-px model)."""
    benchmark = runpy.run_path(osp.join(ROOT, 'tools', 'benchmark_startup.py'))
    rows = benchmark['main'](['--preset', 'internvit_tiny', '--config', QUICKSTART_CONFIG, '--img-size', '112',
                              '--save-states', str(tmp_path), '--timeout', '600'])
    deferred = {(r['strategy'], r['rank']): r['deferred_parameters'] for r in rows}
    backbone_size = sum(p.numel() for p in InternViT('internvit_tiny', img_size=112).parameters())
    assert deferred == {('today', 0): 0, ('today', 1): 0, ('sharded', 0): backbone_size,
                        ('sharded', 1): backbone_size}
    assert_same_states(tmp_path, 'fsdp')


def assert_same_states(directory, engine):
    today = torch.load(directory / f'{engine}_today.pth', weights_only=True)
    sharded = torch.load(directory / f'{engine}_sharded.pth', weights_only=True)
    assert sharded.keys() == today.keys() and any(k.startswith('decode_head.') for k in today)
    for name, value in today.items():
        assert torch.equal(sharded[name], value), name


@pytest.mark.parametrize('preset', ['internvit_tiny', 'internvit_tiny_ln'])
def test_deferred_random_init_equals_an_eager_build_and_continues_the_random_stream(preset):
    torch.manual_seed(3)
    eager = InternViT(preset, depth=2, img_size=56, drop_path_rate=0.1)
    after_eager = torch.rand(4)  # what a head built next would draw
    torch.manual_seed(3)
    with deferred_loading():
        deferred = InternViT(preset, depth=2, img_size=56, drop_path_rate=0.1)
    assert torch.equal(torch.rand(4), after_eager)
    assert all(p.is_meta for p in deferred.parameters())
    torch.manual_seed(5)
    expected_next = torch.rand(4)
    torch.manual_seed(5)
    materialize_all(deferred)  # replaying the initialisation neither depends on nor moves the global stream
    assert torch.equal(torch.rand(4), expected_next)
    expected = eager.state_dict()
    assert deferred.state_dict().keys() == expected.keys()
    for name, value in deferred.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_a_load_into_a_deferred_backbone_gives_it_the_loaded_values(tmp_path):
    """What a runner's load_from does before a sharded start-up wraps the model: load_state_dict into the meta backbone
    checks names and shapes, and the loaded tensors are what its ranks then write (a partial load keeps the rest)."""
    torch.manual_seed(0)
    loaded = InternViT('internvit_tiny', depth=2, img_size=56).state_dict()
    path = str(tmp_path / 'pretrained.safetensors')
    save_file({k: torch.randn_like(v) for k, v in loaded.items()}, path)
    for pretrained in (None, path):
        with deferred_loading():
            model = InternViT('internvit_tiny', depth=2, img_size=56, pretrained=pretrained)
        with pytest.raises(RuntimeError, match='size mismatch for embeddings.class_embedding'):
            model.load_state_dict({**loaded, 'embeddings.class_embedding': torch.zeros(1, 1, 3)})
        model.load_state_dict(loaded)
        assert all(p.is_meta for p in model.parameters())
        materialize_all(model)
        for name, value in model.state_dict().items():
            assert torch.equal(value, loaded[name]), (pretrained, name)
    with deferred_loading():
        model = InternViT('internvit_tiny', depth=2, img_size=56, pretrained=path)
    model.load_state_dict({'encoder.layers.0.ls1': loaded['encoder.layers.0.ls1']}, strict=False)
    materialize_all(model)
    expected = InternViT('internvit_tiny', depth=2, img_size=56, pretrained=path).state_dict()
    expected['encoder.layers.0.ls1'] = loaded['encoder.layers.0.ls1']
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_sharded_startup_refuses_an_init_cfg_that_would_load_the_backbone():
    from segmentation.sharded_startup import _refuse_init_cfg_over
    model = torch.nn.Module()
    model.backbone = torch.nn.Linear(2, 2)
    model.init_cfg = dict(type='Pretrained', checkpoint='init.pth')
    with pytest.raises(ValueError, match=r"init_cfg=.*Pretrained.*would load the backbone \(backbone\) too"):
        _refuse_init_cfg_over(model, 'backbone')
    model.init_cfg = dict(type='Normal', std=0.01)
    _refuse_init_cfg_over(model, 'backbone')


def test_deepspeed_zero3_startup_on_two_ranks_equals_todays(tmp_path):
    """tools/benchmark_startup.py --engine deepspeed, random initialisation (no pretrained), the quick-start segmentor
    on 2 gloo processes: the gathered weights after deepspeed.initialize (ZeRO-3) are bit-identical between MMEngine's
    DeepSpeedStrategy and InternViTDeepSpeedStrategy (backbone partitions written from the replayed initialisation;
    the heads, built after it, draw the same random numbers)."""
    pytest.importorskip('deepspeed')
    benchmark = runpy.run_path(osp.join(ROOT, 'tools', 'benchmark_startup.py'))
    rows = benchmark['main'](['--engine', 'deepspeed', '--random-init', '--preset', 'internvit_tiny', '--config',
                              QUICKSTART_CONFIG, '--img-size', '56', '--save-states', str(tmp_path),
                              '--timeout', '600'])
    backbone_size = sum(p.numel() for p in InternViT('internvit_tiny', img_size=56).parameters())
    assert {(r['strategy'], r['deferred_parameters']) for r in rows} == {('today', 0), ('sharded', backbone_size)}
    assert_same_states(tmp_path, 'deepspeed')
