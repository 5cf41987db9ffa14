"""InternViT(compile=True): every block compiled (inductor on the CPU), the same numbers as eager in fp32.

Compiling is the slow part (about a minute on 2 busy cores with a cold inductor cache): one tiny model per norm
type is compiled once and checked with and without gradient checkpointing (the same compiled graph serves both).
"""
import pytest
import torch
from torch._dynamo.utils import counters

from backbones import InternViT

TINY = dict(depth=2, embed_dim=32, num_heads=2, mlp_dim=64, img_size=28)


def forward_backward(model, x):
    out = model.forward_features(x)
    out.pow(2).mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize('preset', ['internvit_tiny', 'internvit_tiny_ln'])  # RMSNorm + qk-norm; LayerNorm + bias
def test_compiled_blocks_equal_eager_forward_and_backward(preset):
    torch.manual_seed(0)
    eager = InternViT(preset, **TINY).train()
    compiled = InternViT(preset, compile=True, **TINY).train()
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints stay interchangeable
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 28, 28)
    graphs_before = counters['stats']['unique_graphs']
    for checkpointing in (False, True):
        eager.grad_checkpointing = compiled.grad_checkpointing = checkpointing
        ref_out, ref_grads = forward_backward(eager, x)
        out, grads = forward_backward(compiled, x)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-5, msg=f'gradient of {name}')
    # the blocks really ran compiled, and both blocks share one graph (regional compilation)
    assert counters['stats']['unique_graphs'] - graphs_before == 1


def test_compile_asks_for_fullgraph_on_every_block(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda self, **kw: calls.append(kw))
    InternViT('internvit_tiny', compile=True, **TINY)
    assert calls == [dict(fullgraph=True)] * TINY['depth']
