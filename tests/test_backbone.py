"""InternViT model: presets, forward semantics, intermediates, position embeddings, frozen and bf16 modes."""
import math

import pytest
import torch
import torch.nn.functional as F

from backbones import PRESETS, InternViT, count_parameters, resample_pos_embed, vit_forward_flops
from backbones.presets import InternViTArch


def tiny(**kw):
    torch.manual_seed(0)
    return InternViT('internvit_tiny', **kw)


# --------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize('preset,expected', [
    ('internvit_6b_224', 5_902_793_600),
    ('internvit_6b_448', 5_536_496_000),
    ('internvit_300m_448', 304_012_288),
])
def test_preset_parameter_counts_on_meta(preset, expected):
    with torch.device('meta'):
        model = InternViT(preset)
    assert count_parameters(model) == expected
    assert model.depth == {'internvit_6b_224': 48, 'internvit_6b_448': 45, 'internvit_300m_448': 24}[preset]


def test_custom_size_and_overrides():
    model = InternViT(None, embed_dim=48, depth=3, num_heads=3, mlp_dim=96, img_size=28)
    assert model.depth == 3 and model.embed_dim == 48
    assert model.embeddings.position_embedding.shape == (1, 1 + 4, 48)
    with pytest.raises(ValueError, match='not divisible by num_heads'):
        InternViT(None, embed_dim=50, depth=1, num_heads=3, mlp_dim=8)
    with pytest.raises(KeyError, match='unknown InternViT preset'):
        InternViT('internvit_7b')
    with torch.device('meta'):
        deeper = InternViT('internvit_6b_448', depth=48, img_size=224)
    assert count_parameters(deeper) == 5_902_793_600


def test_300m_has_layernorm_qkv_bias_and_no_qk_norm():
    with torch.device('meta'):
        model = InternViT('internvit_300m_448')
    keys = set(model.state_dict())
    assert 'encoder.layers.0.norm1.bias' in keys and 'encoder.layers.0.attn.qkv.bias' in keys
    assert not any('q_norm' in k for k in keys)


def test_flops_formula():
    arch = PRESETS['internvit_6b_224']
    n = 1 + 16 * 16
    assert vit_forward_flops(arch, 224, 224) == 48 * (2 * n * (4 * 3200 ** 2 + 2 * 3200 * 12800) + 4 * n * n * 3200)


# --------------------------------------------------------------------------------------------- semantics
def reference_forward(sd, arch: InternViTArch, x):
    """The published forward written out from the state dict: q/k RMSNorm over the full width before the
    head split, layer scale on both branches, no final norm, bicubic pos-embed resampling (cls kept)."""
    eps = arch.norm_eps

    def rms(t, w):
        t32 = t.float()
        return w * (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + eps)).to(t.dtype)

    def norm(t, prefix):
        if arch.norm_type == 'rms_norm':
            return rms(t, sd[prefix + '.weight'])
        return F.layer_norm(t, (t.shape[-1],), sd[prefix + '.weight'], sd[prefix + '.bias'], eps)

    p = arch.patch_size
    e = F.conv2d(x, sd['embeddings.patch_embedding.weight'], sd['embeddings.patch_embedding.bias'], stride=p)
    b, c, h, w = e.shape
    e = e.flatten(2).transpose(1, 2)
    pos = sd['embeddings.position_embedding']
    s = math.isqrt(pos.shape[1] - 1)
    grid = pos[:, 1:].reshape(1, s, s, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode='bicubic', align_corners=False).reshape(1, c, h * w).permute(0, 2, 1)
    t = torch.cat([sd['embeddings.class_embedding'].expand(b, -1, -1), e], 1) + torch.cat([pos[:, :1], grid], 1)
    heads, hd = arch.num_heads, c // arch.num_heads
    for i in range(arch.depth):
        pre = f'encoder.layers.{i}.'
        y = norm(t, pre + 'norm1')
        qkv = F.linear(y, sd[pre + 'attn.qkv.weight'], sd.get(pre + 'attn.qkv.bias'))
        q, k, v = qkv.split(c, -1)
        if arch.qk_norm:
            q, k = rms(q, sd[pre + 'attn.q_norm.weight']), rms(k, sd[pre + 'attn.k_norm.weight'])
        q, k, v = (z.reshape(b, -1, heads, hd).transpose(1, 2) for z in (q, k, v))
        a = ((q * hd ** -0.5) @ k.transpose(-1, -2)).softmax(-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(b, -1, c), sd[pre + 'attn.proj.weight'], sd[pre + 'attn.proj.bias'])
        t = t + a * sd[pre + 'ls1']
        y = norm(t, pre + 'norm2')
        y = F.linear(F.gelu(F.linear(y, sd[pre + 'mlp.fc1.weight'], sd[pre + 'mlp.fc1.bias'])),
                     sd[pre + 'mlp.fc2.weight'], sd[pre + 'mlp.fc2.bias'])
        t = t + y * sd[pre + 'ls2']
    return t


@pytest.mark.parametrize('preset', ['internvit_tiny', 'internvit_tiny_ln'])
@pytest.mark.parametrize('attn_impl', ['sdpa', 'eager'])
@pytest.mark.parametrize('hw', [(56, 56), (70, 42)])
def test_forward_matches_reference(preset, attn_impl, hw):
    torch.manual_seed(0)
    model = InternViT(preset, attn_impl=attn_impl).eval()
    with torch.no_grad():  # non-trivial layer scale and norms so every term matters
        for name, p in model.named_parameters():
            if name.endswith(('ls1', 'ls2')) or 'norm' in name:
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ours = model.forward_features(x)
        ref = reference_forward(model.state_dict(), model.arch, x)
    assert ours.shape == (2, 1 + (hw[0] // 14) * (hw[1] // 14), 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_layer_scale_and_drop_path_schedule():
    model = tiny(drop_path_rate=0.3)
    probs = [blk.drop_path.drop_prob for blk in model.layers]
    assert probs == pytest.approx(torch.linspace(0, 0.3, 4).tolist())
    assert torch.all(model.layers[0].ls1 == 0.1)
    x = torch.randn(4, 3, 28, 28)
    model.eval()
    torch.testing.assert_close(model.forward_features(x), model.forward_features(x))
    model.train()
    torch.manual_seed(1)
    assert not torch.allclose(model.forward_features(x), model.eval().forward_features(x))


def test_invalid_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r'multiples of the patch size 14; got 57x56'):
        tiny().forward_features(torch.randn(1, 3, 57, 56))


# --------------------------------------------------------------------------------------------- intermediates
def test_intermediates_indices_formats_and_early_stop():
    model = tiny().eval()
    x = torch.randn(2, 3, 42, 56)
    ran = []
    for i, blk in enumerate(model.layers):
        blk.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    with torch.no_grad():
        toks = model.forward_intermediates(x, [-3, 0], 'tokens', with_cls=True)
    assert ran == [0, 1]  # layer -3 of 4 is layer 1: blocks 2 and 3 never run
    assert [t.shape for t in toks] == [(2, 13, 64), (2, 13, 64)]
    with torch.no_grad():
        no_cls = model.forward_intermediates(x, [1], 'tokens', with_cls=False)[0]
        fmap = model.forward_intermediates(x, [1], 'nchw', with_cls=False)[0]
        fmap_cls, cls = model.forward_intermediates(x, [1], 'nchw', with_cls=True)[0]
        last = model.forward_intermediates(x, [-1], 'tokens')[0]
        final = model.forward_features(x)
    torch.testing.assert_close(no_cls, toks[0][:, 1:])
    assert fmap.shape == (2, 64, 3, 4)
    torch.testing.assert_close(fmap[:, :, 1, 2], toks[0][:, 1 + 1 * 4 + 2])  # row-major token order
    torch.testing.assert_close(fmap_cls, fmap)
    torch.testing.assert_close(cls, toks[0][:, 0])
    torch.testing.assert_close(last, final)
    with pytest.raises(IndexError, match='layer index 4 is out of range for a 4-layer InternViT'):
        model.forward_intermediates(x, [4])


def test_forward_returns_out_indices_for_mmseg():
    model = tiny(out_indices=[1, 3]).eval()
    outs = model(torch.randn(1, 3, 56, 56))
    assert isinstance(outs, tuple) and [o.shape for o in outs] == [(1, 64, 4, 4)] * 2
    assert InternViT('internvit_tiny')(torch.randn(1, 3, 28, 28)).shape == (1, 5, 64)


# --------------------------------------------------------------------------------------------- position embeddings
def test_pos_embed_resampling_is_direct_bicubic_and_cached():
    model = tiny(frozen=True)
    pos = model.embeddings.position_embedding.detach()
    out = resample_pos_embed(pos, (5, 3))
    grid = pos[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, size=(5, 3), mode='bicubic', align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, torch.cat([pos[:, :1], direct], 1), atol=0, rtol=0)
    assert resample_pos_embed(pos, (4, 4)) is pos  # native grid: untouched

    first = model.embeddings.position_embedding_for((5, 3), torch.float32)
    assert model.embeddings.position_embedding_for((5, 3), torch.float32) is first
    # An in-place edit (a weight load, a manual change) must not be served from the cache.
    with torch.no_grad():
        model.embeddings.position_embedding.sub_(1.0)
    after = model.embeddings.position_embedding_for((5, 3), torch.float32)
    torch.testing.assert_close(after, first - 1.0, atol=1e-5, rtol=0)
    assert model.forward_features(torch.randn(1, 3, 70, 42)).shape == (1, 16, 64)


def test_trainable_pos_embed_is_never_cached():
    # Under FSDP/ZeRO-3 gathered weights are swapped into parameters without a version bump: a trainable
    # embedding must be resampled from its current values at every call, with or without grad.
    model = tiny()
    with torch.no_grad():
        first = model.embeddings.position_embedding_for((5, 3), torch.float32)
        model.embeddings.position_embedding.data = model.embeddings.position_embedding.data + 1.0
        after = model.embeddings.position_embedding_for((5, 3), torch.float32)
    torch.testing.assert_close(after, first + 1.0, atol=1e-5, rtol=0)
    assert not model.embeddings._pos_cache


def test_pos_embed_gets_gradients_when_trained():
    model = tiny()
    model.forward_features(torch.randn(1, 3, 70, 42)).sum().backward()
    assert model.embeddings.position_embedding.grad is not None
    assert model.embeddings.position_embedding.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- modes
def test_frozen_backbone():
    model = tiny(frozen=True, out_indices=[-1])
    model.train()
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = torch.nn.Conv2d(64, 3, 1)
    opt = torch.optim.AdamW(list(head.parameters()) + list(model.parameters()), lr=1e-1)
    for _ in range(2):
        feats = model(torch.randn(2, 3, 28, 28))[0]
        assert not feats.requires_grad
        loss = head(feats).pow(2).mean()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bf16_backbone_fp32_outputs():
    ref = tiny().eval()
    model = tiny(dtype='bfloat16', frozen=True)
    model.load_state_dict(ref.state_dict())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    x = torch.randn(2, 3, 56, 56)
    out = model.forward_features(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.forward_features(x).detach(), atol=0.1, rtol=0.05)
    head = torch.nn.Linear(64, 2)
    head(out[:, 0]).sum().backward()
    assert head.weight.grad.dtype == torch.float32


def test_grad_checkpointing_same_gradients():
    x = torch.randn(2, 3, 28, 28)
    grads = []
    for ckpt in (False, True):
        model = tiny(grad_checkpointing=ckpt).train()
        model.forward_features(x).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5)


def test_grad_checkpointing_recomputes_every_block_in_backward():
    x = torch.randn(2, 3, 28, 28)
    for ckpt, expected in ((False, 1), (True, 2)):  # checkpointed blocks run again during backward
        model = tiny(grad_checkpointing=ckpt).train()
        calls = [0] * model.depth
        for i, block in enumerate(model.layers):
            block.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
        model.forward_features(x).pow(2).mean().backward()
        assert calls == [expected] * model.depth, (ckpt, calls)
        calls[:] = [0] * model.depth
        with torch.no_grad():  # nothing to recompute without gradients
            model.forward_intermediates(x, [-1])
        assert calls == [1] * model.depth


def test_unknown_dtype_and_attention_are_errors():
    with pytest.raises(ValueError, match="unknown dtype 'bfloat15'"):
        tiny(dtype='bfloat15')
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        tiny(attn_impl='xformers')


def test_construction_errors_name_the_argument():
    with pytest.raises(ValueError, match=r'does not take init_cfg .* pretrained=PATH'):
        InternViT('internvit_tiny', init_cfg=dict(type='Pretrained', checkpoint='missing.pth'))
    with pytest.raises(TypeError, match='unknown InternViT argument\\(s\\) embed_dims'):
        InternViT('internvit_tiny', embed_dims=32)
    with pytest.raises(TypeError, match='without a preset needs num_heads, mlp_dim'):
        InternViT(None, embed_dim=32, depth=2)
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="attn_impl='flash_attn' needs the flash-attn package"):
            tiny(attn_impl='flash_attn')


def test_pretrained_is_loaded_at_construction_without_random_init(tmp_path, monkeypatch):
    from backbones.writing import write_hf
    source = tiny().eval()
    write_hf(source.state_dict(), source.arch, tmp_path / 'hf', dtype=torch.float32)

    def no_init(self):
        raise AssertionError('random init must be skipped when pretrained weights are given')

    monkeypatch.setattr(InternViT, '_init_parameters', no_init)
    model = InternViT('internvit_tiny', pretrained=str(tmp_path / 'hf'), frozen=True)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(1, 3, 56, 42)
    torch.testing.assert_close(model.forward_features(x), source.forward_features(x).detach())
    with pytest.raises(Exception, match='does not exist|not found|No such'):
        InternViT('internvit_tiny', pretrained=str(tmp_path / 'nothing_here'))


# timm's functions replace the project's own only where they do exactly the same: these are the replaced definitions.
def test_timm_resample_abs_pos_embed_is_the_published_resampling():
    import torch.nn.functional as F
    for dtype, (side, h, w) in ((torch.float32, (4, 5, 3)), (torch.bfloat16, (16, 36, 36)), (torch.float32, (6, 4, 4))):
        pos = torch.randn(1, 1 + side * side, 8).to(dtype)
        grid = pos[:, 1:].float().reshape(1, side, side, 8).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode='bicubic', align_corners=False)  # no antialias, float32
        expected = torch.cat([pos[:, :1], grid.reshape(1, 8, h * w).permute(0, 2, 1).to(dtype)], dim=1)
        assert torch.equal(resample_pos_embed(pos, (h, w)), expected)
    with pytest.raises(ValueError, match='5 patch entries, which is not a square grid'):
        resample_pos_embed(torch.zeros(1, 6, 8), (2, 2))


def test_timm_drop_path_is_per_sample_stochastic_depth():
    from timm.layers import DropPath
    x = torch.randn(6, 5, 4)
    for prob in (0.0, 0.25, 0.9):
        torch.manual_seed(0)
        got = DropPath(prob).train()(x)
        torch.manual_seed(0)
        keep = 1.0 - prob
        mask = x.new_empty((6, 1, 1)).bernoulli_(keep)
        assert torch.equal(got, x * mask.div_(keep)), prob
        assert torch.equal(DropPath(prob).eval()(x), x)

