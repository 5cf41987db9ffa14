"""The ecosystem's usual entry points: transformers (native export, AutoModel), timm's registry and state dicts,
hub ids, MMSeg's inference API and demo, result files. CPU, tiny models, no network."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from backbones.internvit import InternViT
from backbones.layouts import from_canonical
from backbones.run_config import arch_from_backbone_config, backbone_config_from_text

REPO = Path(__file__).resolve().parents[1]


def randomized(preset='internvit_tiny', seed=0, **overrides):
    torch.manual_seed(seed)
    model = InternViT(preset, **overrides).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            one = name.endswith(('norm1.weight', 'norm2.weight', 'q_norm.weight', 'k_norm.weight'))
            p.normal_(1.0 if one else 0.0, 0.3 if name.endswith(('ls1', 'ls2')) else 0.1)
    return model


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
