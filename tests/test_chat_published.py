"""Published InternVL-Chat behaviour: tied-LLM export, projector file, remote code, meta file, record rules, bad
images during training, recipe switches."""
import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from chat import ChatCheckpointError, ChatSettings, InternVLChatModel, load_chat_model, save_chat_model
from chat.checkpoint import build_from_parts, read_projector
from chat.data import BadRecordError, DataSource, SFTDataset, load_meta_file
from chat.tiny import build_tiny_parts, build_tiny_tokenizer, colour_square
from chat.tokenization import prepare_tokenizer


def tied_qwen2(vocab_size):
    from transformers import AutoModelForCausalLM, Qwen2Config
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation='sdpa')


@pytest.fixture(scope='module')
def tiny():
    backbone, _, tokenizer = build_tiny_parts(seed=0, image_size=56)
    prepare_tokenizer(tokenizer, 'Hermes-2')
    return backbone, tokenizer


# ---------------------------------------------------------------------------------------------------- export
def test_tied_llm_export_has_its_own_lm_head_and_untied_config(tiny, tmp_path):
    backbone, tokenizer = tiny
    llm = tied_qwen2(len(tokenizer))
    assert llm.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()
    model = InternVLChatModel(backbone, llm, ChatSettings())
    out = save_chat_model(model, tmp_path / 'chat', tokenizer=tokenizer)
    with safe_open(str(out / 'model.safetensors'), 'pt') as f:
        keys = set(f.keys())
        lm_head, embed = f.get_tensor('language_model.lm_head.weight'), f.get_tensor(
            'language_model.model.embed_tokens.weight')
    assert sorted(k for k in keys if k.startswith('language_model.')) == [
        'language_model.lm_head.weight', 'language_model.model.embed_tokens.weight',
        'language_model.model.layers.0.input_layernorm.weight', 'language_model.model.layers.0.mlp.down_proj.weight',
        'language_model.model.layers.0.mlp.gate_proj.weight', 'language_model.model.layers.0.mlp.up_proj.weight',
        'language_model.model.layers.0.post_attention_layernorm.weight',
        'language_model.model.layers.0.self_attn.k_proj.bias', 'language_model.model.layers.0.self_attn.k_proj.weight',
        'language_model.model.layers.0.self_attn.o_proj.weight', 'language_model.model.layers.0.self_attn.q_proj.bias',
        'language_model.model.layers.0.self_attn.q_proj.weight', 'language_model.model.layers.0.self_attn.v_proj.bias',
        'language_model.model.layers.0.self_attn.v_proj.weight', 'language_model.model.norm.weight']
    assert torch.equal(lm_head, embed)
    config = json.loads((out / 'config.json').read_text())
    assert config['llm_config']['tie_word_embeddings'] is False  # what the published InternVLChatConfig forces
    # loaded as the published loader does (untied): the output layer is the saved one, logits unchanged
    loaded = load_chat_model(out)
    assert loaded.language_model.lm_head.weight.data_ptr() != loaded.language_model.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_published_projector_file_loads_as_mlp1(tiny, tmp_path):
    backbone, tokenizer = tiny
    donor = InternVLChatModel(backbone, tied_qwen2(len(tokenizer)), ChatSettings())
    path = tmp_path / 'mlp_projector' / 'tiny.pth'
    path.parent.mkdir()
    torch.save(donor.mlp1.state_dict(), path)  # the published file: a bare mlp1 state dict
    model, _ = build_from_parts(backbone, tied_qwen2(len(tokenizer)), tokenizer, projector=path)
    for key, value in donor.mlp1.state_dict().items():
        assert torch.equal(model.mlp1.state_dict()[key], value), key
    assert sorted(read_projector(path)) == ['0.bias', '0.weight', '1.bias', '1.weight', '3.bias', '3.weight']
    bad = tmp_path / 'bad.pth'
    torch.save({k: v[..., :2] for k, v in donor.mlp1.state_dict().items()}, bad)
    with pytest.raises(ChatCheckpointError, match=r'projector does not fit .*mlp1.0.weight: checkpoint \(2,\)'):
        build_from_parts(backbone, tied_qwen2(len(tokenizer)), tokenizer, projector=bad)


REMOTE_CONFIG = '''from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = 'tiny_remote_llm'
'''
REMOTE_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''


def test_llm_with_remote_code_needs_explicit_trust(tiny, tmp_path):
    backbone, tokenizer = tiny
    _, llm, _ = build_tiny_parts(seed=1)
    llm.resize_token_embeddings(len(tokenizer))
    model = InternVLChatModel(backbone, llm, ChatSettings())
    out = save_chat_model(model, tmp_path / 'v15_like', tokenizer=tokenizer)
    config = json.loads((out / 'config.json').read_text())
    config['llm_config'].update(model_type='tiny_remote_llm', architectures=['TinyRemoteForCausalLM'], auto_map={
        'AutoConfig': 'configuration_tiny_remote.TinyRemoteConfig',
        'AutoModelForCausalLM': 'modeling_tiny_remote.TinyRemoteForCausalLM'})
    (out / 'config.json').write_text(json.dumps(config))
    (out / 'configuration_tiny_remote.py').write_text(REMOTE_CONFIG)
    (out / 'modeling_tiny_remote.py').write_text(REMOTE_MODEL)
    with pytest.raises(ChatCheckpointError, match=r'remote code configuration_tiny_remote.py .*trust_remote_code=True'):
        load_chat_model(out)
    loaded = load_chat_model(out, trust_remote_code=True)
    assert type(loaded.language_model).__name__ == 'TinyRemoteForCausalLM'
    ids = torch.tensor([[5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6, rtol=0)
    # saving it again ships the code with it
    again = save_chat_model(loaded, tmp_path / 'again', tokenizer=tokenizer)
    assert {'configuration_tiny_remote.py', 'modeling_tiny_remote.py'} <= {f.name for f in again.glob('*.py')}
    assert type(load_chat_model(again, trust_remote_code=True).language_model).__name__ == 'TinyRemoteForCausalLM'


# ---------------------------------------------------------------------------------------------------- data
def record(*turns, **extra):
    return {'conversations': [{'from': f, 'value': v} for f, v in turns], **extra}


@pytest.fixture()
def data_dir(tmp_path):
    colour_square('red', 32).save(tmp_path / 'red.png')
    return tmp_path


def write_jsonl(path, records):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return path


def dataset(sources, tokenizer, **kwargs):
    return SFTDataset(sources, tokenizer, num_image_token=2, tile_size=28, system_message='be brief.', **kwargs)


def test_meta_file_with_repeat_time(tiny, data_dir):
    _, tokenizer = tiny
    answers = [f'answer {i}.' for i in range(4)]
    write_jsonl(data_dir / 'a.jsonl', [record(('human', 'q'), ('gpt', a), image='red.png') for a in answers])
    write_jsonl(data_dir / 'b.jsonl', [record(('human', 'q'), ('gpt', 'b.'))])
    meta = data_dir / 'meta.json'
    meta.write_text(json.dumps({
        'half': {'root': str(data_dir), 'annotation': str(data_dir / 'a.jsonl'), 'data_augment': False,
                 'repeat_time': 0.5, 'length': 4, 'max_dynamic_patch': 2},
        'twice': {'root': str(data_dir), 'annotation': str(data_dir / 'b.jsonl'), 'data_augment': False,
                  'repeat_time': 2, 'length': 1}}))
    sources = load_meta_file(meta)
    assert [(s.name, s.repeat_time, s.max_dynamic_patch) for s in sources] == [('half', 0.5, 2), ('twice', 2.0, None)]
    ds = dataset(sources, tokenizer)
    # 0.5 keeps the first half of a.jsonl, 2 repeats b.jsonl
    assert [(e.source.endswith('a.jsonl'), e.index, e.turns[-1][1]) for e in ds.examples] == [
        (True, 0, 'answer 0.'), (True, 1, 'answer 1.'), (False, 0, 'b.'), (False, 0, 'b.')]
    assert ds.examples[0].max_tiles_per_image == 2  # the dataset's max_dynamic_patch
    assert len(ds.lengths) == 4 and ds.lengths[0] > ds.lengths[2]

    meta.write_text(json.dumps({'x': {'root': '.', 'annotation': 'a.jsonl'}}))
    with pytest.raises(ValueError, match=r"meta.json: dataset 'x' lacks repeat_time"):
        load_meta_file(meta)
    meta.write_text(json.dumps({'x': {'root': '.', 'annotation': 'a.jsonl', 'repeat_time': 1.5}}))
    with pytest.raises(ValueError, match='repeat_time must be a fraction in \\(0, 1\\] or a whole number, got 1.5'):
        load_meta_file(meta)


def test_published_record_rules_and_token_truncation(tiny, data_dir):
    _, tokenizer = tiny
    path = write_jsonl(data_dir / 'd.jsonl', [
        record(('gpt', 'stray answer'), ('human', '<image>\nwhat colour?'), ('gpt', 'red.'), image='red.png'),
        record(('human', 'hello'), ('gpt', 'hi.'), image=''),  # "image": "" is text only
        record(('human', 'q'), ('gpt', 'a'), ('human', 'unanswered?')),  # ends with a question: kept
        # published: <image>\n goes in front of the first turn, the leading answer, which is then dropped with it:
        # the image has no place left in the prompt (the published code fails its image-token check)
        record(('gpt', 'stray answer'), ('human', 'what colour?'), ('gpt', 'red.'), image='red.png'),
    ])
    ds = dataset(path, tokenizer)
    assert len(ds) == 3
    assert [(b.index, b.reason) for b in ds.bad_records] == [(3, '0 <image> placeholders for 1 images')]
    first = ds.examples[0]
    assert first.turns == [(0, '<image>\nwhat colour?'), (1, 'red.')] and len(first.images) == 1
    assert ds.examples[1].images == []
    assert ds.examples[2].turns[-1] == (0, 'unanswered?')

    # the project's stricter rules refuse all four (leading answer, empty image path, unanswered question)
    with pytest.raises(ValueError, match=r"no usable SFT records .*\(4 bad; first: .*turn 0 is from 'gpt'"):
        dataset(path, tokenizer, record_rules='strict', truncation='turns')

    long = write_jsonl(data_dir / 'long.jsonl', [
        record(('human', 'what colour is the square? ' * 3 + '<image>'), ('gpt', 'red.'), image='red.png'),
        record(('human', '<image>\nwhat colour is the square?'), ('gpt', 'the square is red. ' * 10), image='red.png')])
    ds = dataset(long, tokenizer, max_length=30)
    assert [b.index for b in ds.bad_records] == [0]
    assert 'cuts off image 1 of 1' in ds.bad_records[0].reason
    item = ds[0]
    assert item['input_ids'].numel() == 30 and ds.examples[0].truncated_tokens > 0
    assert (item['labels'] != -100).any()


def test_unreadable_image_during_training_is_replaced_by_a_seeded_random_record(tiny, data_dir):
    _, tokenizer = tiny
    colour_square('red', 32).save(data_dir / 'later_broken.png')
    path = write_jsonl(data_dir / 'd.jsonl', [record(('human', 'first?'), ('gpt', 'one.'), image='later_broken.png')]
                       + [record(('human', f'question {k}?'), ('gpt', 'two.'), image='red.png') for k in range(1, 6)])
    report = data_dir / 'out' / 'bad.jsonl'
    ds = dataset(path, tokenizer, report_file=report)
    assert len(ds) == 6 and report.read_text() == ''
    data = (data_dir / 'later_broken.png').read_bytes()
    (data_dir / 'later_broken.png').write_bytes(data[:len(data) // 2])  # truncated after the scan

    def replacement(seed):
        ds.seed = seed
        text = tokenizer.decode(ds[0]['input_ids'])  # a usable record instead of a crash
        return [k for k in range(1, 6) if f'question {k}?' in text]

    drawn = [replacement(seed) for seed in range(8)]
    assert all(len(d) == 1 for d in drawn)
    assert drawn == [replacement(seed) for seed in range(8)]  # seeded: the same draws again
    assert len({d[0] for d in drawn}) > 1  # drawn at random, as published (not always the next record)
    assert [(b.index, b.reason.split(':')[0]) for b in ds.bad_records] == [(0, 'cannot read image')]  # once
    assert [json.loads(line)['index'] for line in report.read_text().splitlines()] == [0]
    erroring = dataset(path, tokenizer)
    erroring.on_bad_record = 'error'
    with pytest.raises(BadRecordError, match=r'd.jsonl record 0: cannot read image'):
        erroring[0]
    for k in range(1, 6):
        ds.examples[k] = ds.examples[0]
    with pytest.raises(RuntimeError, match=r'SFT item 0: it and 10 records drawn in its place have unreadable'):
        ds[0]


def test_system_turn_as_the_published_preprocessing_reads_it(data_dir):
    """Published: only preprocess_internvl2_5 reads a 'system' turn (the others fail on it: a bad record);
    internvl2_5 also keeps a leading answer and takes turns in any order."""
    records = [record(('system', 'be terse.'), ('human', 'q?'), ('gpt', 'a.')),
               record(('gpt', 'stray.'), ('human', 'q?'), ('gpt', 'a.'), ('gpt', 'more.')),
               record(('human', 'q?'), ('gpt', 'a.'))]
    path = write_jsonl(data_dir / 's.jsonl', records)
    tokenizer = build_tiny_tokenizer()
    prepare_tokenizer(tokenizer, 'internvl2_5')
    ds = dataset(path, tokenizer, template='internvl2_5')
    assert [(e.system, e.turns) for e in ds.examples] == [
        ('be terse.', [(0, 'q?'), (1, 'a.')]), (None, [(1, 'stray.'), (0, 'q?'), (1, 'a.'), (1, 'more.')]),
        (None, [(0, 'q?'), (1, 'a.')])]
    for template in ('Hermes-2', 'internlm2-chat', 'phi3-chat', 'internvl_zh'):
        prepare_tokenizer(tokenizer, template)
        ds = dataset(path, tokenizer, template=template)
        assert [(b.index, b.reason) for b in ds.bad_records] == [(0, (
            f"a 'system' turn: the published preprocessing of template '{template}' reads human/gpt turns only (a "
            "leading system turn is read by internvl2_5; record_rules='strict' takes it as the system message)")),
            (1, "turn 3 is from 'gpt': turns must alternate, starting with the user")]
        with pytest.raises(BadRecordError, match=r"s.jsonl record 0 \(line 1\): a 'system' turn: the published"):
            dataset(path, tokenizer, template=template, on_bad_record='error')
        strict = dataset(write_jsonl(data_dir / 'one.jsonl', records[:1]), tokenizer, template=template,
                         record_rules='strict')
        assert strict.examples[0].system == 'be terse.'


# ---------------------------------------------------------------------------------------------------- recipe
def test_unfreeze_vit_layers_slices_as_published_and_drop_path_rises_linearly(tiny):
    backbone, tokenizer = tiny
    model = InternVLChatModel(backbone, tied_qwen2(len(tokenizer)), ChatSettings())

    def trained_layers():
        return [all(p.requires_grad for p in layer.parameters()) for layer in model.vision_model.encoder.layers]

    model.set_trainable(backbone=False, unfreeze_vit_layers=1)  # layers[1:]
    assert trained_layers() == [False, True, True, True]
    model.set_trainable(backbone=False, unfreeze_vit_layers=-1)  # layers[-1:]
    assert trained_layers() == [False, False, False, True]
    model.set_trainable(backbone=False, unfreeze_backbone_last=2)
    assert trained_layers() == [False, False, True, True]
    with pytest.raises(ValueError, match=r'unfreeze_vit_layers must be in \[-4, 3\]'):
        model.set_trainable(unfreeze_vit_layers=4)
    model.set_drop_path_rate(0.4)
    assert [round(layer.drop_path.prob, 6) for layer in model.vision_model.encoder.layers] == [
        0.0, round(0.4 / 3, 6), round(0.8 / 3, 6), 0.4]


def test_data_augment_recompresses_tiles_as_jpeg(tiny, data_dir):
    _, tokenizer = tiny
    noisy = Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy())
    noisy.save(data_dir / 'noisy.png')
    write_jsonl(data_dir / 'a.jsonl', [record(('human', 'q'), ('gpt', 'a.'), image='noisy.png')])
    plain, augmented = (dataset(DataSource(data_dir / 'a.jsonl', data_dir, data_augment=flag), tokenizer)[0]
                        for flag in (False, True))
    difference = (plain['pixel_values'] - augmented['pixel_values']).abs().mean().item()
    assert 0.01 < difference < 1.0, difference  # changed by JPEG artefacts, still the same picture


def test_group_by_length_uses_the_scanned_lengths(tiny, data_dir):
    from types import SimpleNamespace

    from transformers.trainer_pt_utils import LengthGroupedSampler

    from chat.sft import _trainer_class
    _, tokenizer = tiny
    write_jsonl(data_dir / 'a.jsonl', [record(('human', 'q ' * n), ('gpt', 'a.')) for n in (1, 30, 5, 60)])
    ds = dataset(data_dir / 'a.jsonl', tokenizer)
    # the trainer's sampler method on a stand-in (building a Trainer costs seconds on this machine)
    trainer = SimpleNamespace(train_dataset=ds, args=SimpleNamespace(
        train_sampling_strategy='group_by_length', train_batch_size=2, gradient_accumulation_steps=1))
    sampler = _trainer_class()._get_train_sampler(trainer)
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == ds.lengths
    assert ds.lengths[3] > ds.lengths[1] > ds.lengths[2] > ds.lengths[0]
