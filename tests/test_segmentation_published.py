"""Published InternViT ADE20K segmentor files (mmseg 0.x layout) load strictly and evaluate, in every runner.

Files are written here from the published key schema (below, written out by hand) at a tiny width with known
values: bf16 backbone, fp32 heads, bare or ``{'meta', 'state_dict'}``. They are evaluated through tools/test.py;
every tensor must arrive in the model (the model's state equals the file after the key mapping), and the model's
outputs must equal a forward pass written here from the file's tensors alone.
"""
import os.path as osp
import re
import runpy

import pytest
import torch
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.registry import HOOKS, DefaultScope
from mmseg.registry import MODELS

import segmentation  # noqa: F401
from mm_adapter.strict_loading import CheckpointMismatchError
from segmentation.published_layout import to_project, to_published
from segmentation.testing import QUICKSTART_CONFIG, as_cli

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
C, DEPTH, HEADS, MLP, CLASSES = 64, 4, 4, 256, 5  # internvit_tiny
CROP = 112
GRID = CROP // 14  # the published files hold the position embedding at the crop's grid (36x36 at 504)
TINY_DATASET = dict(num_train=2, size=CROP)  # data_root: tests/conftest.py
pytestmark = pytest.mark.usefixtures('one_thread')


@HOOKS.register_module(force=True)
class KeepTestedModelHook(Hook):
    """Keeps the model tools/test.py evaluates (after loading) for the checks below."""
    models = []

    def before_test(self, runner):
        KeepTestedModelHook.models.append(runner.model)


# ------------------------------------------------------------------------------------------------ configs
UPERNET = f'''
_base_ = [{QUICKSTART_CONFIG!r}]
model = dict(backbone=dict(img_size={CROP}), neck=dict(norm_cfg=dict(type="LN2d", eps=1e-6)))
custom_hooks = [dict(type='KeepTestedModelHook')]
'''
LINEAR = f'''
_base_ = [{QUICKSTART_CONFIG!r}]
model = dict(
    backbone=dict(img_size={CROP}, out_indices=[{DEPTH - 1}]), neck=None, auxiliary_head=None,
    decode_head=dict(_delete_=True, type='LinearBNHead', in_channels={C}, in_index=0, num_classes={CLASSES},
                     dropout_ratio=0.0, norm_cfg=dict(type='BN', requires_grad=True), align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)))
custom_hooks = [dict(type='KeepTestedModelHook')]
'''
def write(path, text):
    path.write_text(text)
    return str(path)


def data_options(data_root):
    options = {}
    for split in ('train', 'val', 'test'):
        options.update({f'{split}_dataloader.dataset.data_root': data_root, f'{split}_dataloader.num_workers': 0,
                        f'{split}_dataloader.persistent_workers': False})
    return options


# ------------------------------------------------------------------------------------------ published schema
def published_backbone_schema():
    shapes = {'backbone.cls_token': (1, 1, C), 'backbone.pos_embed': (1, 1 + GRID * GRID, C),
              'backbone.patch_embed.proj.weight': (C, 3, 14, 14), 'backbone.patch_embed.proj.bias': (C,)}
    for i in range(DEPTH):
        b = f'backbone.blocks.{i}.'
        shapes.update({
            b + 'norm1.weight': (C,), b + 'attn.qkv.weight': (3 * C, C), b + 'attn.q_norm.weight': (C,),
            b + 'attn.k_norm.weight': (C,), b + 'attn.proj.weight': (C, C), b + 'attn.proj.bias': (C,),
            b + 'ls1.gamma': (C,), b + 'norm2.weight': (C,), b + 'mlp.fc1.weight': (MLP, C),
            b + 'mlp.fc1.bias': (MLP,), b + 'mlp.fc2.weight': (C, MLP), b + 'mlp.fc2.bias': (C,),
            b + 'ls2.gamma': (C,)})
    return shapes


NECK_SCHEMA = {  # x4: ConvTranspose2d, LayerNorm, GELU, ConvTranspose2d; x2: ConvTranspose2d
    'backbone.up1.0.weight': (C, C, 2, 2), 'backbone.up1.0.bias': (C,), 'backbone.up1.1.weight': (C,),
    'backbone.up1.1.bias': (C,), 'backbone.up1.3.weight': (C, C, 2, 2), 'backbone.up1.3.bias': (C,),
    'backbone.up2.0.weight': (C, C, 2, 2), 'backbone.up2.0.bias': (C,)}
LINEAR_HEAD_SCHEMA = {
    'decode_head.norm.weight': (C,), 'decode_head.norm.bias': (C,), 'decode_head.norm.running_mean': (C,),
    'decode_head.norm.running_var': (C,), 'decode_head.norm.num_batches_tracked': (),
    'decode_head.conv_seg.weight': (CLASSES, C, 1, 1), 'decode_head.conv_seg.bias': (CLASSES,)}


def mmseg_head_schema(config_text, tmp_path):
    """UPerHead / FCNHead names and shapes: mmseg 1.x kept mmseg 0.x's names for both heads."""
    from mmengine.config import Config
    cfg = Config.fromfile(write(tmp_path / 'heads_cfg.py', config_text))
    with DefaultScope.overwrite_default_scope('mmseg'):
        shapes = {}
        for name in ('decode_head', 'auxiliary_head'):
            head = MODELS.build(cfg.model[name])
            shapes.update({f'{name}.{k}': tuple(v.shape) for k, v in head.state_dict().items()})
    return shapes


def known_values(shapes, seed=0):
    """Distinct values per tensor; backbone and neck in bf16, heads fp32 (as released)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        leaf = name.rsplit('.', 1)[-1]
        if leaf == 'num_batches_tracked':
            value = torch.tensor(1234)
        elif leaf == 'running_var':
            value = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith(('norm1.weight', 'norm2.weight', 'q_norm.weight', 'k_norm.weight', 'up1.1.weight',
                            'norm.weight')) or re.search(r'\.bn\.weight$', name):
            value = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            value = 0.05 * torch.randn(shape, generator=g)
        out[name] = value.to(torch.bfloat16) if name.startswith('backbone.') else value
    return out


def save(state_dict, path, wrapped):
    torch.save({'meta': {'iter': 80000, 'mmseg_version': '0.30.0'}, 'state_dict': state_dict} if wrapped
               else state_dict, path)
    return str(path)


@pytest.fixture(scope='module')
def upernet_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('upernet')
    shapes = {**published_backbone_schema(), **NECK_SCHEMA, **mmseg_head_schema(UPERNET, tmp)}
    return known_values(shapes, seed=1)


@pytest.fixture(scope='module')
def linear_file():
    return known_values({**published_backbone_schema(), **LINEAR_HEAD_SCHEMA}, seed=2)


# ------------------------------------------------------------------------------------------------ reference
def rms(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def reference_backbone(sd, images, layers):
    """InternViT forward from the published tensors alone (fp32): feature maps of ``layers``."""
    p = {k[len('backbone.'):]: v.float() for k, v in sd.items() if k.startswith('backbone.')}
    x = F.conv2d(images, p['patch_embed.proj.weight'], p['patch_embed.proj.bias'], stride=14)
    b, _, h, w = x.shape
    x = torch.cat([p['cls_token'].expand(b, -1, -1), x.flatten(2).transpose(1, 2)], 1) + p['pos_embed']
    maps = {}
    for i in range(max(layers) + 1):
        q = f'blocks.{i}.'
        y = rms(x, p[q + 'norm1.weight'])
        qs, ks, vs = (y @ p[q + 'attn.qkv.weight'].T).chunk(3, dim=-1)
        qs, ks = rms(qs, p[q + 'attn.q_norm.weight']), rms(ks, p[q + 'attn.k_norm.weight'])
        split = [t.reshape(b, -1, HEADS, C // HEADS).transpose(1, 2) for t in (qs, ks, vs)]
        att = torch.softmax(split[0] @ split[1].transpose(-1, -2) / (C // HEADS) ** 0.5, -1) @ split[2]
        att = att.transpose(1, 2).reshape(b, -1, C) @ p[q + 'attn.proj.weight'].T + p[q + 'attn.proj.bias']
        x = x + p[q + 'ls1.gamma'] * att
        y = rms(x, p[q + 'norm2.weight'])
        y = F.gelu(y @ p[q + 'mlp.fc1.weight'].T + p[q + 'mlp.fc1.bias']) @ p[q + 'mlp.fc2.weight'].T
        x = x + p[q + 'ls2.gamma'] * (y + p[q + 'mlp.fc2.bias'])
        maps[i] = x[:, 1:].transpose(1, 2).reshape(b, C, h, w)
    return [maps[i] for i in layers]


def reference_pyramid(sd, maps):
    p = {k: v.float() for k, v in sd.items()}
    x4 = F.conv_transpose2d(maps[0], p['backbone.up1.0.weight'], p['backbone.up1.0.bias'], stride=2)
    mean, var = x4.mean(1, keepdim=True), x4.var(1, keepdim=True, unbiased=False)
    x4 = (x4 - mean) / torch.sqrt(var + 1e-6) * p['backbone.up1.1.weight'][:, None, None] \
        + p['backbone.up1.1.bias'][:, None, None]
    x4 = F.conv_transpose2d(F.gelu(x4), p['backbone.up1.3.weight'], p['backbone.up1.3.bias'], stride=2)
    x2 = F.conv_transpose2d(maps[1], p['backbone.up2.0.weight'], p['backbone.up2.0.bias'], stride=2)
    return [x4, x2, maps[2], F.max_pool2d(maps[3], 2)]


def reference_linear_head(sd, fmap):
    h = {k[len('decode_head.'):]: v.float() for k, v in sd.items() if k.startswith('decode_head.')}
    x = (fmap - h['norm.running_mean'][:, None, None]) / torch.sqrt(h['norm.running_var'][:, None, None] + 1e-5)
    x = x * h['norm.weight'][:, None, None] + h['norm.bias'][:, None, None]
    return F.conv2d(x, h['conv_seg.weight'], h['conv_seg.bias'])


# --------------------------------------------------------------------------------------------------- helpers
def run_test_tool(argv):
    namespace = runpy.run_path(osp.join(ROOT, 'tools', 'test.py'), run_name='tools_test')
    return namespace['main'](argv)


def evaluate(config, checkpoint, data_root, work_dir, launcher='none', **extra):
    KeepTestedModelHook.models.clear()
    metrics = run_test_tool([config, checkpoint, '--work-dir', str(work_dir), '--launcher', launcher,
                             '--cfg-options', *as_cli({**data_options(data_root), **extra})])
    return metrics, KeepTestedModelHook.models[-1]


def assert_every_tensor_arrived(model, published):
    mapped = to_project(published)
    state = model.state_dict()
    assert sorted(state) == sorted(mapped)  # nothing missing, nothing left over
    for name, value in mapped.items():
        assert torch.equal(state[name], value.to(state[name].dtype)), name


# ----------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize('wrapped', [True], ids=['meta+state_dict'])  # both forms: the linear test, the FSDP one
def test_published_upernet_file_evaluates_with_every_tensor_in_place(upernet_file, data_root, tmp_path, wrapped):
    config = write(tmp_path / 'upernet.py', UPERNET)
    checkpoint = save(upernet_file, tmp_path / 'upernet_published.pth', wrapped)
    metrics, model = evaluate(config, checkpoint, data_root, tmp_path / 'work')
    assert {'mIoU', 'aAcc', 'mAcc'} <= set(metrics)
    assert_every_tensor_arrived(model, upernet_file)
    images = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model.extract_feat(images)
        maps = reference_backbone(upernet_file, images, [0, 1, 2, 3])
        expected = reference_pyramid(upernet_file, maps)
    for level, (a, b) in enumerate(zip(ours, expected)):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=2e-4, rtol=1e-4), (level, (a - b).abs().max())


@pytest.mark.parametrize('wrapped', [False, True], ids=['bare', 'meta+state_dict'])
def test_published_linear_file_evaluates_with_every_tensor_in_place(linear_file, data_root, tmp_path, wrapped):
    config = write(tmp_path / 'linear.py', LINEAR)
    checkpoint = save(linear_file, tmp_path / 'linear_published.pth', wrapped)
    # the segmentor file holds the backbone: the config's pretrained backbone file is not needed (here: absent)
    metrics, model = evaluate(config, checkpoint, data_root, tmp_path / 'work',
                              **{'model.backbone.pretrained': str(tmp_path / 'not_downloaded.pth')})
    assert {'mIoU', 'aAcc', 'mAcc'} <= set(metrics)
    assert_every_tensor_arrived(model, linear_file)
    assert model.decode_head.norm.num_batches_tracked.item() == 1234
    images = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = model.decode_head(model.extract_feat(images))
        expected = reference_linear_head(linear_file, reference_backbone(linear_file, images, [DEPTH - 1])[0])
    assert torch.allclose(ours, expected, atol=2e-4, rtol=1e-4), (ours - expected).abs().max()


def broken(published, kind):
    """(state dict, the name the error must give) for one missing / extra / mis-shaped tensor."""
    sd = dict(published)
    if kind == 'missing':
        del sd['backbone.blocks.2.attn.qkv.weight']
        return sd, 'backbone.encoder.layers.2.attn.qkv.weight'
    if kind == 'extra':
        sd['decode_head.conv_extra.weight'] = torch.zeros(3)
        return sd, 'decode_head.conv_extra.weight'
    sd['decode_head.conv_seg.weight'] = torch.zeros(CLASSES + 1, C, 1, 1)
    return sd, (rf'decode_head.conv_seg.weight: checkpoint \({CLASSES + 1}, {C}, 1, 1\) vs model '
                rf'\({CLASSES}, {C}, 1, 1\)')


KINDS = ['missing', 'extra', 'shape']
MESSAGES = {'missing': 'missing from the checkpoint', 'extra': 'not in the model', 'shape': 'another shape'}


@pytest.mark.parametrize('kind', KINDS)
def test_test_tool_refuses_a_file_that_does_not_fit(linear_file, data_root, tmp_path, kind):
    config = write(tmp_path / 'linear.py', LINEAR)
    sd, name = broken(linear_file, kind)
    checkpoint = save(sd, tmp_path / f'{kind}.pth', wrapped=True)
    with pytest.raises(CheckpointMismatchError, match=rf'{re.escape(checkpoint)}.*{MESSAGES[kind]}.*{name}'):
        evaluate(config, checkpoint, data_root, tmp_path / 'work')


def test_many_problems_are_counted_after_a_handful(linear_file, data_root, tmp_path):
    config = write(tmp_path / 'linear.py', LINEAR)
    sd = {k: v for k, v in linear_file.items() if not k.startswith('backbone.blocks.')}
    checkpoint = save(sd, tmp_path / 'no_blocks.pth', wrapped=False)
    count = 13 * DEPTH  # tensors per InternViT block (no qkv bias)
    with pytest.raises(CheckpointMismatchError, match=rf'{count} tensors of the model are missing from the checkpoint: '
                                                      rf'backbone\.encoder\.layers\.0\.[^,]+(, [^,]+){{4}} and '
                                                      rf'{count - 5} more'):
        evaluate(config, checkpoint, data_root, tmp_path / 'work')


def test_partial_load_only_when_asked(linear_file, data_root, tmp_path):
    config = write(tmp_path / 'linear.py', LINEAR)
    sd, _ = broken(linear_file, 'shape')
    checkpoint = save(sd, tmp_path / 'other_head.pth', wrapped=True)
    _, model = evaluate(config, checkpoint, data_root, tmp_path / 'work', allow_partial_load=True)
    state = model.state_dict()
    mapped = to_project(linear_file)
    assert all(torch.equal(state[k], mapped[k].to(state[k].dtype)) for k in mapped if 'conv_seg.weight' not in k)
    assert state['decode_head.conv_seg.weight'].shape == (CLASSES, C, 1, 1)


def test_train_tool_load_from_is_strict(linear_file, data_root, tmp_path):
    config = write(tmp_path / 'linear.py', LINEAR)
    sd, name = broken(linear_file, 'missing')
    checkpoint = save(sd, tmp_path / 'missing.pth', wrapped=True)
    namespace = runpy.run_path(osp.join(ROOT, 'tools', 'train.py'), run_name='tools_train')
    options = {**data_options(data_root), 'load_from': checkpoint, 'train_cfg.max_iters': 1}
    with pytest.raises(CheckpointMismatchError, match=rf'{re.escape(checkpoint)}.*{name}'):
        namespace['main']([config, '--work-dir', str(tmp_path / 'train'), '--cfg-options', *as_cli(options)])


def test_flexible_runner_loads_before_wrapping_and_refuses(linear_file, data_root, tmp_path):
    """FlexibleRunner (here its single-device strategy; FSDP below, DeepSpeed hooks in at the same place)."""
    config = write(tmp_path / 'linear_flexible.py', LINEAR + "runner_type = 'FlexibleRunner'\n")
    good = save(linear_file, tmp_path / 'good.pth', wrapped=False)
    plain, _ = evaluate(write(tmp_path / 'linear.py', LINEAR), good, data_root, tmp_path / 'plain')
    flexible, model = evaluate(config, good, data_root, tmp_path / 'flexible')
    assert_every_tensor_arrived(model, linear_file)
    assert flexible['mIoU'] == pytest.approx(plain['mIoU'], abs=1e-6)
    sd, name = broken(linear_file, 'extra')
    bad = save(sd, tmp_path / 'extra.pth', wrapped=False)
    with pytest.raises(CheckpointMismatchError, match=rf'{re.escape(bad)}.*{name}'):
        evaluate(config, bad, data_root, tmp_path / 'flexible_bad')


STRATEGIES = {
    'fsdp': """
runner_type = 'FlexibleRunner'
strategy = dict(type='FSDPStrategy', state_dict_cfg='full',
                model_wrapper=dict(type='InternViTBlockFSDP', block_param_dtype=None))
""",
    'deepspeed': """
runner_type = 'FlexibleRunner'
strategy = dict(type='DeepSpeedStrategy', zero_optimization=dict(stage=3), train_micro_batch_size_per_gpu=2,
                gradient_accumulation_steps=1)
optim_wrapper = dict(_delete_=True, type='DeepSpeedOptimWrapper', optimizer=dict(type='AdamW', lr=1e-4))
""",
}


@pytest.fixture
def one_rank_group(monkeypatch):
    """A one-process gloo group, as torchrun would set up (tools/test.py --launcher pytorch); torn down after."""
    import socket

    import mmengine._strategy.deepspeed as engine_deepspeed
    import torch.distributed as dist
    try:  # MMEngine registers DeepSpeed's optimizers without force=True in every DeepSpeedStrategy: once only
        engine_deepspeed.register_deepspeed_optimizers()
    except KeyError:
        pass  # registered earlier in this process
    monkeypatch.setattr(engine_deepspeed, 'register_deepspeed_optimizers', lambda: [])
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    for key, value in dict(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', LOCAL_WORLD_SIZE='1',
                           MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope='module')
def plain_upernet_metrics(upernet_file, data_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('plain')
    metrics, _ = evaluate(write(tmp / 'upernet.py', UPERNET), save(upernet_file, tmp / 'good.pth', wrapped=False),
                          data_root, tmp / 'work')
    return metrics


@pytest.mark.parametrize('strategy', ['fsdp', 'deepspeed'])
def test_distributed_strategies_evaluate_a_published_file(strategy, upernet_file, plain_upernet_metrics, data_root,
                                                          tmp_path, one_rank_group):
    """FSDP and DeepSpeed ZeRO-3 (one gloo rank on the CPU): the file is loaded into the bare model before the
    strategy shards it, so the evaluation equals the plain runner's, whose model holds every tensor (above)."""
    if strategy == 'deepspeed':
        pytest.importorskip('deepspeed')
    config = write(tmp_path / f'upernet_{strategy}.py', UPERNET + STRATEGIES[strategy])
    checkpoint = save(upernet_file, tmp_path / 'good.pth', wrapped=strategy == 'fsdp')
    metrics, model = evaluate(config, checkpoint, data_root, tmp_path / 'work', launcher='pytorch')
    assert type(model).__name__ == {'fsdp': 'InternViTBlockFSDP', 'deepspeed': 'MMDeepSpeedEngineWrapper'}[strategy]
    for key in ('mIoU', 'aAcc', 'mAcc'):
        assert metrics[key] == pytest.approx(plain_upernet_metrics[key], abs=1e-4)


@pytest.mark.parametrize('strategy', ['fsdp', 'deepspeed'])
@pytest.mark.parametrize('kind', KINDS)
def test_distributed_strategies_refuse_a_file_that_does_not_fit(strategy, kind, upernet_file, data_root, tmp_path,
                                                                one_rank_group):
    if strategy == 'deepspeed':
        pytest.importorskip('deepspeed')
    config = write(tmp_path / f'upernet_{strategy}.py', UPERNET + STRATEGIES[strategy])
    sd, name = broken(upernet_file, kind)
    if kind == 'shape':
        sd['decode_head.conv_seg.weight'] = torch.zeros(CLASSES + 1, 32, 1, 1)  # UPerHead channels 32
        name = r'decode_head.conv_seg.weight: checkpoint \(6, 32, 1, 1\) vs model \(5, 32, 1, 1\)'
    checkpoint = save(sd, tmp_path / f'{kind}.pth', wrapped=True)
    with pytest.raises(CheckpointMismatchError, match=rf'{re.escape(checkpoint)}.*{MESSAGES[kind]}.*{name}'):
        evaluate(config, checkpoint, data_root, tmp_path / 'work', launcher='pytorch')


def test_published_layout_round_trip_is_exact(upernet_file):
    """Project checkpoint -> published layout -> project, at the crop grid (36x36 at 504), bit for bit."""
    project = to_project(upernet_file)
    assert project['backbone.embeddings.position_embedding'].shape == (1, 1 + GRID * GRID, C)
    assert 'neck.branches.0.1.weight' in project and 'neck.branches.1.0.bias' in project
    published = to_published(project)
    assert sorted(published) == sorted(upernet_file)
    assert all(torch.equal(published[k], upernet_file[k]) and published[k].dtype == upernet_file[k].dtype
               for k in upernet_file)
    again = to_project(published)
    assert all(torch.equal(again[k], project[k]) for k in project)
    assert to_project(project).keys() == project.keys()  # the project's own names pass unchanged


def test_backbone_trains_and_stores_the_crop_grid_resampled_once_at_load(tmp_path):
    """img_size=CROP (504 in the 6B configs): the pretrained 4x4 grid (16x16 at 224) is resampled once at load to
    8x8 (36x36), then that parameter is what the forward adds, what trains and what a checkpoint stores."""
    from backbones import InternViT, resample_pos_embed
    pretrained = InternViT('internvit_tiny')  # img_size 56: a 4x4 grid, like the 224px file's 16x16
    with torch.no_grad():
        pretrained.embeddings.position_embedding.normal_()
    path = tmp_path / 'pretrained.pth'
    torch.save(pretrained.state_dict(), path)
    model = InternViT('internvit_tiny', img_size=CROP, pretrained=str(path), out_indices=[DEPTH - 1])
    pos = model.embeddings.position_embedding
    assert isinstance(pos, torch.nn.Parameter) and pos.requires_grad and pos.shape == (1, 1 + GRID * GRID, C)
    expected = resample_pos_embed(pretrained.embeddings.position_embedding.detach(), (GRID, GRID))
    assert torch.equal(pos.detach(), expected)
    assert model.state_dict()['embeddings.position_embedding'].shape == (1, 1 + GRID * GRID, C)
    model(torch.randn(1, 3, CROP, CROP))[0].sum().backward()
    assert pos.grad is not None and pos.grad[:, 1:].abs().sum() > 0  # trained as a 36x36 parameter, not resampled
    with torch.no_grad():  # the forward adds the stored grid as it is: a change at one position moves one token
        before = model.embeddings(torch.zeros(1, 3, CROP, CROP))
        pos[:, 5] += 1.0
        after = model.embeddings(torch.zeros(1, 3, CROP, CROP))
    changed = (after - before).abs().sum(-1)[0]
    assert changed.nonzero().flatten().tolist() == [5]
