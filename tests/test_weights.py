"""Weight layouts: reading every layout, round trips, loading checks, HF/native/chat export, errors by message."""
import filecmp
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from backbones.arch_config import arch_for_weights, hf_config_from_arch
from backbones.atomic import EXPORT_MARKER
from backbones.internvit import InternViT
from backbones.layouts import WeightsError, from_canonical, to_canonical
from backbones.loading import load_into_model
from backbones.reading import read_weights
from backbones.writing import write_hf, write_hf_native, write_into_chat

from helpers import randomized

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / 'tools' / 'export_to_chat.py'


def canonical(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(a, b):
    assert set(a) == set(b), (set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope='module')
def rms():
    return randomized('internvit_tiny')


@pytest.fixture(scope='module')
def ln():
    return randomized('internvit_tiny_ln', seed=1)


@pytest.fixture
def logs():
    """Text logged by the backbones package (standard logging) during the test."""
    import io
    import logging
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger('backbones')
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream.getvalue
    logger.removeHandler(handler)
    logger.setLevel(level)


def images(size=56, n=2, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- layouts in memory
@pytest.mark.parametrize('preset', ['internvit_tiny', 'internvit_tiny_ln'])
@pytest.mark.parametrize('layout,prefix', [('hf', ''), ('hf', 'vision_model.'), ('original', ''),
                                           ('original', 'backbone.'), ('native', 'vision_tower.'),
                                           ('native', 'model.vision_tower.')])
def test_layout_round_trip_in_memory(preset, layout, prefix):
    sd = canonical(randomized(preset))
    converted = from_canonical(sd, layout, prefix)
    assert all(k.startswith(prefix) for k in converted)
    if layout == 'native':
        assert f'{prefix}encoder.layer.0.attention.q_proj.weight' in converted
        assert f'{prefix}embeddings.patch_embeddings.projection.weight' in converted
    back, detected = to_canonical(converted)
    assert detected == layout
    assert_bit_identical(back, sd)


# --------------------------------------------------------------------------------------------- files and directories
@pytest.mark.parametrize('shard_bytes', [5 * 2 ** 30, 40_000])
def test_hf_dir_round_trip(tmp_path, rms, shard_bytes):
    sd = canonical(rms)
    out = write_hf(sd, rms.arch, tmp_path / 'hf', dtype=torch.float32, max_shard_bytes=shard_bytes)
    assert (out / EXPORT_MARKER).is_file()  # marks it as an export that overwrite=True may replace
    files = sorted(p.name for p in out.iterdir() if p.name != EXPORT_MARKER)
    if shard_bytes < 2 ** 20:
        index = json.loads((out / 'model.safetensors.index.json').read_text())
        shards = sorted(set(index['weight_map'].values()))
        assert len(shards) > 1 and shards[0] == f'model-00001-of-{len(shards):05d}.safetensors'
        assert set(index['weight_map']) == set(sd)
        assert index['metadata']['total_size'] == sum(t.numel() * 4 for t in sd.values())
        # huggingface_hub's sharding (save_pretrained's): name order, a new file when the next tensor would not
        # fit, a tensor larger than the limit alone in its own file
        names = sorted(sd, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', n)])
        for shard in shards:
            held = [n for n in names if index['weight_map'][n] == shard]
            assert len(held) == 1 or sum(sd[n].numel() * 4 for n in held) <= shard_bytes
        too_large = [n for n in names if sd[n].numel() * 4 > shard_bytes]
        assert 'embeddings.patch_embedding.weight' in too_large
        for name in too_large:
            assert [n for n in names if index['weight_map'][n] == index['weight_map'][name]] == [name]
    else:
        assert files == ['config.json', 'model.safetensors']
    with safe_open(str(out / (files[1] if shard_bytes < 2 ** 20 else 'model.safetensors')), 'pt') as f:
        assert f.metadata() == {'format': 'pt'}
    config = json.loads((out / 'config.json').read_text())
    assert config['architectures'] == ['InternVisionModel'] and config['model_type'] == 'intern_vit_6b'
    assert (config['hidden_size'], config['num_hidden_layers'], config['num_attention_heads'],
            config['intermediate_size'], config['image_size'], config['qk_normalization'],
            config['norm_type'], config['torch_dtype']) == (64, 4, 4, 256, 56, True, 'rms_norm', 'float32')
    weights = read_weights(out)
    assert weights.layout == 'hf' and weights.hf_config['num_attention_heads'] == 4
    assert_bit_identical(weights.state_dict, sd)
    assert arch_for_weights(weights) == rms.arch


def test_hf_dir_bf16_and_pytorch_model_bin(tmp_path, ln):
    sd = canonical(ln)
    out = write_hf(sd, ln.arch, tmp_path / 'bf16')
    weights = read_weights(out)
    assert_bit_identical(weights.state_dict, {k: v.to(torch.bfloat16) for k, v in sd.items()})
    assert arch_for_weights(weights) == ln.arch
    # the older pytorch_model.bin form, sharded with an index
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    shutil.copy(out / 'config.json', bin_dir)
    keys = sorted(sd)
    torch.save({k: sd[k] for k in keys[:20]}, bin_dir / 'pytorch_model-00001-of-00002.bin')
    torch.save({k: sd[k] for k in keys[20:]}, bin_dir / 'pytorch_model-00002-of-00002.bin')
    weight_map = {k: f'pytorch_model-0000{1 if i < 20 else 2}-of-00002.bin' for i, k in enumerate(keys)}
    (bin_dir / 'pytorch_model.bin.index.json').write_text(json.dumps({'weight_map': weight_map}))
    assert_bit_identical(read_weights(bin_dir).state_dict, sd)


def test_original_pth_wrapped_with_clip_projector(tmp_path, rms, logs):
    sd = canonical(rms)
    original = from_canonical(sd, 'original')
    assert 'blocks.0.ls1.gamma' in original and 'cls_token' in original and 'patch_embed.proj.weight' in original
    extra = {'clip_projector.norm1_q.weight': torch.ones(64), 'clip_projector.cross_attn.q.weight': torch.ones(2, 2)}
    for wrapper in ('module', 'model', 'state_dict', None):
        path = tmp_path / f'{wrapper}.pth'
        payload = {**original, **extra}
        torch.save(payload if wrapper is None else {wrapper: payload}, path)
        weights = read_weights(path)
        assert weights.layout == 'original'
        assert_bit_identical(weights.state_dict, sd)
    assert 'ignored 2 tensors outside the backbone: clip_projector.* (2)' in logs()


def test_mmengine_training_checkpoint(tmp_path, rms, ln, logs):
    """A real MMEngine checkpoint pickles its message hub (HistoryBuffer, numpy); tensors still load safely."""
    from mmengine.logging import HistoryBuffer
    buffer = HistoryBuffer()
    buffer.update(np.float64(1.5))
    for model, layout, prefix in ((rms, 'hf', 'backbone.'), (ln, 'original', 'backbone.'),
                                  (rms, 'hf', 'vision_model.')):
        sd = canonical(model)
        state = {**from_canonical(sd, layout, prefix),
                 'decode_head.conv_seg.weight': torch.zeros(150, 64, 1, 1),
                 'auxiliary_head.conv_seg.weight': torch.zeros(150, 64, 1, 1),
                 'decode_head.conv_seg.bias': torch.zeros(150)}
        path = tmp_path / f'iter_{layout}_{prefix}.pth'
        torch.save({'meta': {'epoch': 1, 'seed': np.int64(3)}, 'state_dict': state,
                    'message_hub': {'log_scalars': {'train/loss': buffer}}, 'optimizer': {'state': {}}}, path)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        assert 'mmengine.logging.history_buffer.HistoryBuffer' in unsafe and 'builtins.getattr' in unsafe
        weights = read_weights(path)
        assert weights.layout == layout
        assert_bit_identical(weights.state_dict, sd)
    out = logs()
    assert 'ignored 3 tensors outside the backbone: auxiliary_head.* (1), decode_head.* (2)' in out
    assert 'not unpickled' in out


@pytest.mark.parametrize('prefix', ['', 'vision_tower.', 'model.vision_tower.'])
def test_native_safetensors_file(tmp_path, ln, prefix):
    sd = canonical(ln)
    state = {k: v.contiguous() for k, v in from_canonical(sd, 'native', prefix).items()}
    if prefix:
        state[prefix.replace('vision_tower.', '') + 'multi_modal_projector.linear_1.weight'] = torch.zeros(2, 2)
    save_file(state, str(tmp_path / 'native.safetensors'))
    weights = read_weights(tmp_path / 'native.safetensors')
    assert weights.layout == 'native'
    assert_bit_identical(weights.state_dict, sd)


def test_hf_and_original_layouts_give_identical_outputs(tmp_path, rms):
    sd = canonical(rms)
    write_hf(sd, rms.arch, tmp_path / 'hf', dtype=torch.float32)
    torch.save({'module': from_canonical(sd, 'original')}, tmp_path / 'orig.pth')
    from_hf = InternViT.from_pretrained(str(tmp_path / 'hf')).eval()
    from_original = InternViT('internvit_tiny', pretrained=str(tmp_path / 'orig.pth')).eval()
    x = images()
    with torch.no_grad():
        a, b, ref = from_hf.forward_features(x), from_original.forward_features(x), rms.forward_features(x)
    assert torch.equal(a, b) and torch.equal(a, ref)


def test_pos_embed_resampled_at_load_matches_bicubic(rms):
    pos = rms.embeddings.position_embedding.detach().clone()
    bigger = InternViT('internvit_tiny', img_size=112)
    load_into_model(bigger, canonical(rms), source='test')
    grid = pos[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, size=(8, 8), mode='bicubic', align_corners=False)
    expected = torch.cat([pos[:, :1], direct.permute(0, 2, 3, 1).reshape(1, 64, 64)], dim=1)
    got = bigger.embeddings.position_embedding.detach()
    assert got.shape == (1, 65, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.equal(got[:, 1:9], pos[:, 1:5].repeat(1, 2, 1))  # really interpolated


def test_from_pretrained_hf_dir_and_bf16_model(tmp_path, ln):
    write_hf(canonical(ln), ln.arch, tmp_path / 'hf', image_size=84, dtype=torch.float32)
    model = InternViT.from_pretrained(str(tmp_path / 'hf'))
    assert model.arch == replace(ln.arch, img_size=84)
    model = InternViT.from_pretrained(str(tmp_path / 'hf'), img_size=56, dtype='bfloat16', frozen=True)
    assert model.arch == ln.arch and model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    out = model.forward_features(images())
    assert out.dtype == torch.float32 and torch.allclose(out, ln.forward_features(images()), atol=0.1)


# --------------------------------------------------------------------------------------------- transformers' InternVL
@pytest.mark.parametrize('preset', ['internvit_tiny', 'internvit_tiny_ln'])
def test_equivalence_with_transformers_internvl_vision_model(tmp_path, preset):
    """Our forward equals transformers' own InternVLVisionModel on the same weights (native layout export)."""
    from transformers import InternVLVisionModel
    model = randomized(preset, seed=3)
    out = write_hf_native(canonical(model), model.arch, tmp_path / 'native', dtype=torch.float32)
    config = json.loads((out / 'config.json').read_text())
    assert config['model_type'] == 'internvl_vision' and config['use_mean_pooling'] is True
    theirs = InternVLVisionModel.from_pretrained(str(out), attn_implementation='eager').eval()
    assert theirs.config.use_qk_norm == model.arch.qk_norm and theirs.config.norm_type == model.arch.norm_type
    assert set(theirs.state_dict()) == set(from_canonical(canonical(model), 'native'))  # the same names exactly
    for size in (56, 84):  # 84: both models interpolate the 4x4 position grid to 6x6
        x = images(size, seed=size)
        with torch.no_grad():
            expected = theirs(pixel_values=x).last_hidden_state
            got = model.forward_features(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # and their own state dict reads back bit-identically through our reader
    theirs.save_pretrained(str(tmp_path / 'saved'))
    assert_bit_identical(read_weights(tmp_path / 'saved').state_dict, canonical(model))


# --------------------------------------------------------------------------------------------- load errors
def test_load_errors_name_tensors_shapes_and_source(rms):
    sd = canonical(rms)
    model = InternViT('internvit_tiny')
    missing = {k: v for k, v in sd.items() if k != 'encoder.layers.1.mlp.fc2.bias'}
    with pytest.raises(WeightsError, match=r'ckpt\.pth: 1 tensors of the model are missing from the checkpoint: '
                                            r'encoder\.layers\.1\.mlp\.fc2\.bias'):
        load_into_model(model, missing, source='ckpt.pth')
    with pytest.raises(WeightsError, match=r'1 tensors of the checkpoint are not in the model: '
                                           r'encoder\.layers\.0\.attn\.extra'):
        load_into_model(model, {**sd, 'encoder.layers.0.attn.extra': torch.zeros(1)}, source='ckpt.pth')
    wrong = {**sd, 'encoder.layers.2.mlp.fc1.weight': torch.zeros(128, 64)}
    with pytest.raises(WeightsError, match=re.escape('encoder.layers.2.mlp.fc1.weight: checkpoint (128, 64) vs '
                                                     'model (256, 64)')):
        load_into_model(model, wrong, source='ckpt.pth')
    before = canonical(model)
    with pytest.raises(WeightsError):
        load_into_model(model, {**sd, 'encoder.layers.0.ls1': torch.zeros(3)}, source='ckpt.pth')
    assert_bit_identical(canonical(model), before)  # nothing copied when a check fails
    shallow = InternViT('internvit_tiny', depth=3)
    with pytest.raises(WeightsError, match='has 4 layers but the model has 3; pass strict=False'):
        load_into_model(shallow, sd, source='ckpt.pth')
    load_into_model(shallow, sd, source='ckpt.pth', strict=False)
    assert torch.equal(shallow.encoder.layers[2].mlp.fc1.weight, sd['encoder.layers.2.mlp.fc1.weight'])
    # missing keys with strict=False: loaded what is there, logged the rest
    load_into_model(model, missing, source='ckpt.pth', strict=False)


def test_one_mismatch_listing_names_counts_and_both_shapes():
    """backbones.loading.compare_state_dicts / describe: the listing every strict load uses (backbone, runners,
    resume, probe heads)."""
    from backbones.loading import compare_state_dicts, describe_mismatch
    expected = {f'layers.{i}.w': torch.zeros(2, 3) for i in range(12)} | {'_extra_state': torch.zeros(7)}
    found = {f'layers.{i}.w': torch.zeros(3, 3) for i in range(1, 12)} | {'extra': torch.zeros(1),
                                                                           '_extra_state': torch.zeros(9)}
    mismatch = compare_state_dicts(found, expected)
    assert mismatch.missing == ['layers.0.w'] and mismatch.unexpected == ['extra']
    assert len(mismatch.misshaped) == 11 and '_extra_state' not in mismatch.misshaped  # metadata of any length
    lines = mismatch.describe()
    assert lines == ['1 tensors of the model are missing from the checkpoint: layers.0.w',
                     '1 tensors of the checkpoint are not in the model: extra',
                     '11 tensors have another shape: layers.1.w: checkpoint (3, 3) vs model (2, 3); '
                     'layers.2.w: checkpoint (3, 3) vs model (2, 3); layers.3.w: checkpoint (3, 3) vs model (2, 3); '
                     'layers.4.w: checkpoint (3, 3) vs model (2, 3); layers.5.w: checkpoint (3, 3) vs model (2, 3) '
                     'and 6 more']
    renamed = describe_mismatch(found, expected, shown=1, rename=lambda k: 'file/' + k, found_as='source',
                                expected_as='chat')
    assert renamed[0] == '1 tensors of the chat are missing from the source: file/layers.0.w'
    assert renamed[2] == '11 tensors have another shape: file/layers.1.w: source (3, 3) vs chat (2, 3) and 10 more'
    shapes = {k: v.shape for k, v in expected.items()}  # names -> torch.Size works as the expected side too
    assert compare_state_dicts(found, shapes) == mismatch
    assert not compare_state_dicts(expected, shapes) and describe_mismatch(expected, expected) == []


def test_pretrained_errors(tmp_path, rms):
    with pytest.raises(FileNotFoundError, match='does/not/exist.pth does not exist'):
        InternViT('internvit_tiny', pretrained=str(tmp_path / 'does/not/exist.pth'))
    heads_only = tmp_path / 'heads.pth'
    torch.save({'state_dict': {'decode_head.conv_seg.weight': torch.zeros(3, 64, 1, 1)}}, heads_only)
    with pytest.raises(WeightsError, match='heads.pth loads nothing'):
        InternViT('internvit_tiny', pretrained=str(heads_only))
    with pytest.raises(WeightsError, match='number of attention heads cannot be read.*num_heads'):
        torch.save(from_canonical(canonical(rms), 'original'), tmp_path / 'o.pth')
        arch_for_weights(read_weights(tmp_path / 'o.pth'))
    assert arch_for_weights(read_weights(tmp_path / 'o.pth'), num_heads=4) == rms.arch


def test_corrupt_and_truncated_files_are_named(tmp_path, rms):
    sd = canonical(rms)
    torch.save(sd, tmp_path / 'full.pth')
    data = (tmp_path / 'full.pth').read_bytes()
    (tmp_path / 'truncated.pth').write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r'cannot read .*truncated\.pth: the file is corrupt, truncated'):
        read_weights(tmp_path / 'truncated.pth')
    (tmp_path / 'garbage.bin').write_bytes(b'not a checkpoint at all' * 10)
    with pytest.raises(WeightsError, match=r'cannot read .*garbage\.bin'):
        read_weights(tmp_path / 'garbage.bin')
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / 'full.safetensors'))
    data = (tmp_path / 'full.safetensors').read_bytes()
    (tmp_path / 'cut.safetensors').write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match=r'cannot read .*cut\.safetensors: the file is corrupt, truncated'):
        read_weights(tmp_path / 'cut.safetensors')
    hf = write_hf(sd, rms.arch, tmp_path / 'hf', max_shard_bytes=40_000)
    shard = sorted(hf.glob('model-*.safetensors'))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(WeightsError, match=re.escape(shard.name)):
        read_weights(hf)


class _Exploit:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize('func', [os.system, exec])
def test_malicious_pickle_is_refused(tmp_path, rms, func):
    marker = tmp_path / 'pwned'
    code = f'touch {marker}' if func is os.system else f'open({str(marker)!r}, "w").close()'
    payload = {'state_dict': canonical(rms), 'meta': {'hook': _Exploit(func, code)}}
    torch.save(payload, tmp_path / 'evil.pth')
    with pytest.raises(WeightsError, match=r'refused to load .*evil\.pth.*weights_only'):
        read_weights(tmp_path / 'evil.pth')
    with pytest.raises(WeightsError, match='refused'):
        InternViT('internvit_tiny', pretrained=str(tmp_path / 'evil.pth'))
    assert not marker.exists()


def test_write_refuses_existing_dir_and_overwrites_atomically(tmp_path, rms):
    sd = canonical(rms)
    out = write_hf(sd, rms.arch, tmp_path / 'out')  # a previous export
    (out / 'keep.txt').write_text('old')
    with pytest.raises(FileExistsError, match=f'{re.escape(str(out))} already exists; pass overwrite=True'):
        write_hf(sd, rms.arch, out)
    assert (out / 'keep.txt').read_text() == 'old'
    with pytest.raises(WeightsError, match='another shape'):  # a failed write leaves the old dir untouched
        write_hf({**sd, 'encoder.layers.0.ls1': torch.zeros(3)}, rms.arch, out, overwrite=True)
    assert (out / 'keep.txt').read_text() == 'old'
    write_hf(sd, rms.arch, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [EXPORT_MARKER, 'config.json', 'model.safetensors']
    assert [p.name for p in tmp_path.iterdir()] == ['out']  # no temporary directories left behind


# --------------------------------------------------------------------------------------------- chat checkpoints
LLM = {'language_model.model.embed_tokens.weight': (torch.float32, (32, 16)),
       'language_model.model.norm.weight': (torch.bfloat16, (16,)),
       'language_model.lm_head.weight': (torch.bfloat16, (32, 16))}
PROJECTOR = {'mlp1.0.weight': (torch.float32, (256,)), 'mlp1.1.weight': (torch.bfloat16, (16, 256)),
             'mlp1.3.weight': (torch.bfloat16, (16, 16))}


def make_chat(path: Path, model: InternViT, image_size=112, native=False) -> Path:
    """A small InternVL-Chat directory: an LLM-only shard, a mixed shard, a vision-only shard, other files."""
    torch.manual_seed(7)
    path.mkdir(parents=True)
    theirs = randomized(model.arch, seed=11)
    vision_sd = canonical(theirs)
    grid = image_size // model.arch.patch_size
    vision_sd['embeddings.position_embedding'] = torch.randn(1, 1 + grid * grid, model.arch.embed_dim)
    if native:
        from backbones.arch_config import native_config_from_arch
        vision = from_canonical(vision_sd, 'native', 'model.vision_tower.')
        config = {'architectures': ['InternVLForConditionalGeneration'], 'model_type': 'internvl',
                  'vision_config': native_config_from_arch(model.arch, image_size), 'text_config': {}}
    else:
        vision = from_canonical(vision_sd, 'hf', 'vision_model.')
        config = {'architectures': ['InternVLChatModel'], 'model_type': 'internvl_chat',
                  'vision_config': hf_config_from_arch(model.arch, image_size), 'llm_config': {}, 'select_layer': -1,
                  'downsample_ratio': 0.5, 'force_image_size': image_size}
    vision = {k: v.to(torch.bfloat16).contiguous() for k, v in vision.items()}
    other = {k: torch.randn(shape).to(dtype) for k, (dtype, shape) in {**LLM, **PROJECTOR}.items()}
    names = sorted(vision)
    shards = {'model-00001-of-00003.safetensors': {k: other[k] for k in LLM},
              'model-00002-of-00003.safetensors': {**{k: other[k] for k in PROJECTOR},
                                                   **{k: vision[k] for k in names[:10]}},
              'model-00003-of-00003.safetensors': {k: vision[k] for k in names[10:]}}
    weight_map = {}
    for file, tensors in shards.items():
        save_file(tensors, str(path / file), metadata={'format': 'pt', 'note': file})
        weight_map.update({k: file for k in tensors})
    (path / 'model.safetensors.index.json').write_text(json.dumps({'metadata': {'total_size': 1},
                                                                   'weight_map': weight_map}, indent=2))
    (path / 'config.json').write_text(json.dumps(config, indent=2))
    (path / 'tokenizer.json').write_text('{"tokens": []}')
    (path / 'modeling_internvl_chat.py').write_text('# remote code\n')
    (path / 'sub').mkdir()
    (path / 'sub' / 'notes.txt').write_text('kept')
    return path


def check_chat_copy(chat: Path, out: Path, source_sd, image_size=112, prefix='vision_model.', layout='hf'):
    chat_files = sorted(p.relative_to(chat) for p in chat.rglob('*') if p.is_file())
    assert sorted(p.relative_to(out) for p in out.rglob('*') if p.is_file() and p.name != EXPORT_MARKER) == chat_files
    for rel in ('config.json', 'tokenizer.json', 'modeling_internvl_chat.py', 'sub/notes.txt',
                'model.safetensors.index.json', 'model-00001-of-00003.safetensors'):
        assert filecmp.cmp(chat / rel, out / rel, shallow=False), rel
    expected_sd = dict(source_sd)
    grid = image_size // 14
    pos = expected_sd['embeddings.position_embedding']
    from backbones.pos_embed import resample_pos_embed
    expected_sd['embeddings.position_embedding'] = resample_pos_embed(pos.float(), (grid, grid))
    expected = from_canonical(expected_sd, layout, prefix)
    for shard in ('model-00002-of-00003.safetensors', 'model-00003-of-00003.safetensors'):
        old, new = load_file(str(chat / shard)), load_file(str(out / shard))
        assert set(old) == set(new)
        with safe_open(str(out / shard), 'pt') as f:
            assert f.metadata() == {'format': 'pt', 'note': shard}
        for k in old:
            assert new[k].dtype == old[k].dtype and new[k].shape == old[k].shape, k
            if k.startswith(prefix):
                assert torch.equal(new[k], expected[k].to(old[k].dtype)), k
            else:
                assert torch.equal(new[k], old[k]), k  # other tensors bit-identical


def test_chat_dir_reads_only_vision_shards(tmp_path, rms):
    chat = make_chat(tmp_path / 'chat', rms)
    (chat / 'model-00001-of-00003.safetensors').write_bytes(b'corrupt LLM shard, never opened')
    weights = read_weights(chat)
    assert weights.layout == 'hf' and weights.hf_config['image_size'] == 112
    arch = arch_for_weights(weights)
    assert arch == replace(rms.arch, img_size=112)
    model = InternViT.from_pretrained(str(chat))
    assert model.embeddings.position_embedding.shape == (1, 65, 64)


def test_write_into_native_chat(tmp_path, ln):
    chat = make_chat(tmp_path / 'chat', ln, image_size=84, native=True)
    sd = canonical(ln)
    out = write_into_chat(sd, chat, tmp_path / 'out')
    check_chat_copy(chat, out, sd, image_size=84, prefix='model.vision_tower.', layout='native')
    weights = read_weights(out)
    assert weights.layout == 'native' and arch_for_weights(weights).img_size == 84


def load_tool():
    spec = importlib.util.spec_from_file_location('export_to_chat', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_to_chat_script_into_chat_with_verify(tmp_path, rms):
    """End to end as users run it: an MMEngine segmentation checkpoint into a copy of a chat model."""
    sd = canonical(rms)
    src = tmp_path / 'iter_80000.pth'
    torch.save({'meta': {}, 'state_dict': {**from_canonical(sd, 'hf', 'backbone.'),
                                           'decode_head.conv_seg.weight': torch.zeros(2, 64, 1, 1)}}, src)
    chat = make_chat(tmp_path / 'chat', rms)
    snapshot = {p: p.read_bytes() for p in chat.rglob('*') if p.is_file()}
    out = tmp_path / 'chat_new'
    proc = subprocess.run([sys.executable, str(TOOL), str(src), str(out), '--into-chat', str(chat), '--verify',
                           '--num-heads', '4'], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_chat_copy(chat, out, sd)
    assert {p: p.read_bytes() for p in chat.rglob('*') if p.is_file()} == snapshot  # chat dir untouched
    diff = float(re.search(r'verify: max abs difference (\S+)', proc.stdout).group(1))
    assert 0 < diff < 0.05  # bf16 storage of the chat checkpoint
    assert 'rewrote model-00002-of-00003.safetensors' in proc.stdout


def test_export_to_chat_hf_dir_errors_and_overwrite(tmp_path, rms, capsys):
    tool = load_tool()
    sd = canonical(rms)
    src = tmp_path / 'orig.pth'
    torch.save({'module': from_canonical(sd, 'original')}, src)
    out = tmp_path / 'hf'
    assert tool.main([str(src), str(out), '--image-size', '84', '--dtype', 'float32', '--verify',
                      '--num-heads', '4']) == 0
    printed = capsys.readouterr().out
    diff = float(re.search(r'verify: max abs difference (\S+)', printed).group(1))
    assert diff < 1e-5
    config = json.loads((out / 'config.json').read_text())
    assert config['image_size'] == 84 and config['torch_dtype'] == 'float32'
    assert load_file(str(out / 'model.safetensors'))['embeddings.position_embedding'].shape == (1, 37, 64)
    # OUT exists: refused without --overwrite, replaced with it
    assert tool.main([str(src), str(out), '--num-heads', '4']) == 2
    assert f'{out} already exists; pass overwrite=True (--overwrite)' in capsys.readouterr().err
    assert tool.main([str(src), str(out), '--num-heads', '4', '--overwrite']) == 0
    assert json.loads((out / 'config.json').read_text())['image_size'] == 448
    # into a chat model whose vision tower has another shape: named tensor, both shapes
    chat = make_chat(tmp_path / 'chat', InternViT('internvit_tiny', mlp_dim=128))
    assert tool.main([str(src), str(tmp_path / 'x'), '--into-chat', str(chat), '--num-heads', '4']) == 2
    err = capsys.readouterr().err
    assert 'vision_model.encoder.layers.0.mlp.fc1.weight: source (256, 64) vs chat vision model (128, 64)' in err
    assert not (tmp_path / 'x').exists()
    # never in place
    assert tool.main([str(src), str(chat), '--into-chat', str(chat), '--overwrite', '--num-heads', '4']) == 2
    assert 'never made in place' in capsys.readouterr().err
    # a model with a different depth does not fit
    deeper = randomized('internvit_tiny', depth=5)
    with pytest.raises(WeightsError, match='the chat vision model has 4 layers, the source 5'):
        write_into_chat(canonical(deeper), make_chat(tmp_path / 'chat4', rms), tmp_path / 'y')


def test_probe_and_deepspeed_checkpoints_say_what_to_export(tmp_path):
    record = {'format': 'linear-probe', 'backbone': {'sha256': 'ab12', 'pretrained': '/models/InternViT-6B-224px'}}
    probe = {'state_dict': {'heads.0.weight': torch.zeros(3, 4),
                            '_extra_state': torch.tensor(list(json.dumps(record).encode()), dtype=torch.uint8)}}
    torch.save(probe, tmp_path / 'epoch_10.pth')
    with pytest.raises(WeightsError, match=r'linear-probe checkpoint.*/models/InternViT-6B-224px \(sha256 ab12\)'):
        read_weights(tmp_path / 'epoch_10.pth')
    ds = tmp_path / 'iter_8000.pth'
    ds.mkdir()
    torch.save({'module': {}}, ds / 'mp_rank_00_model_states.pt')
    with pytest.raises(WeightsError, match='is a DeepSpeed checkpoint folder: consolidate it first'):
        read_weights(ds)


# --------------------------------------------------------------------------------------------- build and load
def test_from_pretrained_runs_no_random_init_and_places_each_tensor_in_its_dtype(tmp_path, ln, monkeypatch):
    from backbones.reading import _MAPPINGS
    write_hf(canonical(ln), ln.arch, tmp_path / 'hf', image_size=56, dtype=torch.bfloat16)
    stored = load_file(str(tmp_path / 'hf' / 'model.safetensors'))

    def no_init(*args, **kwargs):
        raise AssertionError('from_pretrained must not initialise randomly')
    monkeypatch.setattr(InternViT, '_init_parameters', no_init)
    monkeypatch.setattr(torch.nn.init, 'trunc_normal_', no_init)

    def in_a_mapping(t):
        return any(base <= t.data_ptr() < base + size for base, (_, size) in _MAPPINGS.items())

    weights = read_weights(tmp_path / 'hf')
    assert all(in_a_mapping(t) for t in weights.state_dict.values())  # read memory-mapped, nothing copied yet
    for dtype in (torch.bfloat16, torch.float32):
        model = InternViT.from_pretrained(str(tmp_path / 'hf'), dtype=dtype)
        # the file's dtype: the parameters are (copy-on-write) views of the file; another dtype: one copy each
        assert [in_a_mapping(p) for p in model.parameters()] == [dtype == torch.bfloat16] * len(stored)
        for name, value in model.state_dict().items():
            assert value.dtype == dtype and torch.equal(value, stored[name].to(dtype)), name
    # the released pages of the mapped tensors read back from the file unchanged; writes stay private
    assert all(torch.equal(weights.state_dict[k], stored[k]) for k in stored)
    model = InternViT.from_pretrained(str(tmp_path / 'hf'), dtype=torch.bfloat16)
    with torch.no_grad():
        model.embeddings.position_embedding.add_(1)
    assert torch.equal(load_file(str(tmp_path / 'hf' / 'model.safetensors'))['embeddings.position_embedding'],
                       stored['embeddings.position_embedding'])


def test_build_and_load_refuses_a_partial_checkpoint_without_leaving_meta_tensors(ln):
    from backbones.loading import build_and_load
    sd = canonical(ln)
    del sd['encoder.layers.0.ls1']
    with pytest.raises(WeightsError, match=r'missing from the checkpoint: encoder\.layers\.0\.ls1'):
        build_and_load(lambda: InternViT(ln.arch), sd, source='partial')
    with pytest.raises(WeightsError, match=r'not in the checkpoint: encoder\.layers\.0\.ls1'):
        build_and_load(lambda: InternViT(ln.arch), sd, source='partial', strict=False)
