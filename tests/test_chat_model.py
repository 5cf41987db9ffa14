"""InternVL-Chat model: pixel shuffle, projector, forward/loss, select_layer, save/load, chat()."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from chat import (
    IMG_CONTEXT_TOKEN,
    ChatCheckpointError,
    ChatSettings,
    InternVLChatModel,
    build_from_parts,
    load_chat_model,
    load_tokenizer,
    pixel_shuffle,
    save_chat_model,
)
from chat.tiny import build_tiny_parts


@pytest.fixture(scope='module')
def base():
    backbone, llm, tokenizer = build_tiny_parts(0)
    model, tokenizer = build_from_parts(backbone, llm, tokenizer, settings=ChatSettings(template='Hermes-2'))
    return model.eval(), tokenizer


def fresh(base, **settings):
    """A copy of the module's tiny model (tests may change it), with chat settings changed if asked."""
    model, tokenizer = base
    model = copy.deepcopy(model)
    for name, value in settings.items():
        setattr(model.settings, name, value)
    return model, tokenizer


def encode(model, tokenizer, question='what colour is the square?', answer='the square is red.', tiles=1):
    prompt = model.build_prompt('<image>\n' + question, num_patches_list=[tiles])
    ids = tokenizer(prompt + answer + '<|im_end|>', add_special_tokens=False, return_tensors='pt')['input_ids']
    return ids


# ---------------------------------------------------------------------------------------------------- pixel shuffle
def test_pixel_shuffle_v2_matches_hand_computation():
    x = torch.randn(2, 6, 4, 3)
    out = pixel_shuffle(x, 0.5, 'v2')
    assert out.shape == (2, 3, 2, 12)
    for b in range(2):
        for i in range(3):
            for j in range(2):
                expected = torch.cat([x[b, 2 * i, 2 * j], x[b, 2 * i, 2 * j + 1],
                                      x[b, 2 * i + 1, 2 * j], x[b, 2 * i + 1, 2 * j + 1]])
                assert torch.equal(out[b, i, j], expected)


def test_pixel_shuffle_v1_is_v2_transposed_and_448_shape():
    x = torch.randn(1, 32, 32, 8)  # a 448px tile: 32x32 patches
    v2 = pixel_shuffle(x, 0.5, 'v2')
    assert v2.shape == (1, 16, 16, 32)  # 256 tokens of 4C
    assert torch.equal(pixel_shuffle(x, 0.5, 'v1'), v2.transpose(1, 2))
    # ratio 1/4: 16 neighbours, row-major
    q = pixel_shuffle(x, 0.25, 'v2')
    assert torch.equal(q[0, 1, 2], torch.cat([x[0, 4 + di, 8 + dj] for di in range(4) for dj in range(4)]))


def test_pixel_shuffle_rejects_bad_input():
    with pytest.raises(ValueError, match='divisible by 2'):
        pixel_shuffle(torch.randn(1, 5, 4, 3))
    with pytest.raises(ValueError, match='must be 1/k'):
        pixel_shuffle(torch.randn(1, 4, 4, 3), 0.3)
    with pytest.raises(ValueError, match="ps_version must be 'v1' or 'v2'"):
        pixel_shuffle(torch.randn(1, 4, 4, 3), 0.5, 'v3')


# ---------------------------------------------------------------------------------------------------- forward
def test_projector_keys_and_image_token_count(base):
    model, _ = fresh(base)
    shapes = {k: tuple(v.shape) for k, v in model.mlp1.state_dict().items()}
    assert shapes == {'0.weight': (256,), '0.bias': (256,), '1.weight': (32, 256), '1.bias': (32,),
                      '3.weight': (32, 32), '3.bias': (32,)}  # LayerNorm(4C) -> Linear -> GELU -> Linear
    assert model.num_image_token == 4  # 56px: 4x4 patches -> 2x2 after pixel shuffle
    assert set(k.split('.')[0] for k in model.state_dict()) == {'vision_model', 'mlp1', 'language_model'}


def test_forward_loss_is_masked_next_token_cross_entropy(base):
    model, tokenizer = fresh(base)
    ids = encode(model, tokenizer)
    pixels = torch.randn(1, 3, 56, 56)
    labels = ids.clone()
    labels[:, :-6] = -100  # learn only the last tokens
    out = model(input_ids=ids, pixel_values=pixels, labels=labels)
    logits = out.logits[0, :-1]
    target = labels[0, 1:]
    expected = F.cross_entropy(logits.float(), target, ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert out.loss.item() > 0


def test_image_context_embeddings_are_the_projected_vision_tokens(base):
    model, tokenizer = fresh(base)
    ids = encode(model, tokenizer, tiles=2)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        embeds = model.embed_inputs(ids, pixels)
        vision = model.extract_feature(pixels)  # [2 tiles, 4 tokens, 32]
        text = model.language_model.get_input_embeddings()(ids)
    mask = ids[0] == tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    assert int(mask.sum()) == 8
    assert torch.equal(embeds[0, mask], vision.reshape(8, -1))
    assert torch.equal(embeds[0, ~mask], text[0, ~mask])
    # and the pixels reach the loss
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels).logits
        b = model(input_ids=ids, pixel_values=pixels.flip(-1)).logits
    assert not torch.allclose(a[0, -1], b[0, -1])


@pytest.mark.parametrize('select_layer,blocks', [(-3, 2), (2, 2), (0, 0), (-5, 0), (4, 4), (-1, 4), (1, 1)])
def test_extract_feature_follows_select_layer(base, select_layer, blocks):
    """select_layer indexes the published hidden_states (5 entries for 4 layers): 0 is the embedding output,
    k >= 0 the output of k blocks, -k the k-th entry from the end."""
    model, _ = fresh(base, select_layer=select_layer)
    pixels = torch.randn(1, 3, 56, 56)
    vision = model.vision_model
    with torch.no_grad():
        tokens = vision.embeddings(pixels)
        for block in vision.encoder.layers[:blocks]:
            tokens = block(tokens)
        expected = model.mlp1(pixel_shuffle(tokens[:, 1:].reshape(1, 4, 4, 64)).reshape(1, 4, 256))
        torch.testing.assert_close(model.extract_feature(pixels), expected, atol=1e-5, rtol=1e-5)


def test_select_layer_range(base):
    model, _ = fresh(base)
    with pytest.raises(ValueError, match='select_layer 5 is out of range for a 4-layer'):
        InternVLChatModel(model.vision_model, model.language_model, ChatSettings(select_layer=5))
    with pytest.raises(ValueError, match='select_layer -6 is out of range'):
        InternVLChatModel(model.vision_model, model.language_model, ChatSettings(select_layer=-6))


def test_context_token_count_mismatch_is_an_error(base):
    model, tokenizer = fresh(base)
    ids = encode(model, tokenizer, tiles=1)
    with pytest.raises(ValueError, match=r'4 <IMG_CONTEXT> tokens but the images give 8 vision tokens'):
        model(input_ids=ids, pixel_values=torch.randn(2, 3, 56, 56))


def test_set_trainable_switches(base):
    model, _ = fresh(base)
    counts = model.set_trainable(backbone=False, llm=False, projector=True, unfreeze_backbone_last=1)
    layer = sum(p.numel() for p in model.vision_model.encoder.layers[-1].parameters())
    assert counts['vision_model'] == layer
    assert counts['language_model'] == 0
    assert counts['mlp1'] == sum(p.numel() for p in model.mlp1.parameters())
    assert not any(p.requires_grad for p in model.vision_model.encoder.layers[-2].parameters())
    with pytest.raises(ValueError, match='between 0 and the backbone depth 4, got 5'):
        model.set_trainable(unfreeze_backbone_last=5)


# ---------------------------------------------------------------------------------------------------- save / load
def test_save_load_gives_identical_outputs(base, tmp_path):
    model, tokenizer = fresh(base)
    out = save_chat_model(model, tmp_path / 'chat', tokenizer=tokenizer, max_shard_bytes=100_000)
    config = json.loads((out / 'config.json').read_text())
    assert config['architectures'] == ['InternVLChatModel'] and config['model_type'] == 'internvl_chat'
    assert config['vision_config']['num_hidden_layers'] == 4 and config['llm_config']['model_type'] == 'llama'
    assert (config['select_layer'], config['downsample_ratio'], config['ps_version'], config['template']) == \
        (-1, 0.5, 'v2', 'Hermes-2')
    index = json.loads((out / 'model.safetensors.index.json').read_text())['weight_map']
    assert {k.split('.')[0] for k in index} == {'vision_model', 'mlp1', 'language_model'}
    assert len(set(index.values())) > 1  # sharded

    loaded = load_chat_model(out)
    loaded_tokenizer = load_tokenizer(out, loaded)
    assert loaded.img_context_token_id == model.img_context_token_id
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    ids = encode(loaded, loaded_tokenizer)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits,
                           loaded(input_ids=ids, pixel_values=pixels).logits)

    with pytest.raises(FileExistsError, match='already exists; pass overwrite=True'):
        save_chat_model(model, out)
    save_chat_model(loaded, out, tokenizer=tokenizer, overwrite=True)  # one file now: the stale index must go
    assert not (out / 'model.safetensors.index.json').exists()
    assert not list(tmp_path.glob('.chat.*'))  # no temporary directories left behind
    assert torch.equal(load_chat_model(out).mlp1[1].weight, model.mlp1[1].weight)


def test_bf16_save_and_v1_default_for_old_configs(base, tmp_path):
    model, tokenizer = fresh(base)
    out = save_chat_model(model, tmp_path / 'chat', tokenizer=tokenizer, dtype='bfloat16')
    config = json.loads((out / 'config.json').read_text())
    assert config['torch_dtype'] == 'bfloat16'
    del config['ps_version']  # V1-1/V1-2 configs predate ps_version
    (out / 'config.json').write_text(json.dumps(config))
    loaded = load_chat_model(out)
    assert loaded.settings.ps_version == 'v1'
    assert loaded.mlp1[1].weight.dtype == torch.bfloat16
    assert torch.equal(loaded.mlp1[1].weight, model.mlp1[1].weight.bfloat16())


def test_load_errors_name_the_problem(base, tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_chat_model(tmp_path / 'nowhere')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ChatCheckpointError, match='has no config.json'):
        load_chat_model(tmp_path / 'empty')
    model, tokenizer = fresh(base)
    out = save_chat_model(model, tmp_path / 'chat')
    config = json.loads((out / 'config.json').read_text())
    (out / 'config.json').write_text(json.dumps({k: v for k, v in config.items() if k != 'llm_config'}))
    with pytest.raises(ChatCheckpointError, match="has no 'llm_config' object"):
        load_chat_model(out)
    config['llm_config']['hidden_size'] = 48
    config['llm_config']['head_dim'] = 12
    (out / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ChatCheckpointError, match='do not fit LlamaForCausalLM'):
        load_chat_model(out)


# ---------------------------------------------------------------------------------------------------- chat()
def _greedy_by_hand(model, ids, pixels, steps, stop_ids):
    """Greedy decoding by re-running the full forward pass each step (no cache): the reference for chat()."""
    generated = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
        token = int(logits.argmax())
        if token in stop_ids:
            break
        generated.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return generated


def test_chat_generates_the_greedy_answer_and_keeps_history(base):
    model, tokenizer = fresh(base)
    pixels = torch.randn(1, 3, 56, 56)
    answer, history = model.chat(tokenizer, pixels, 'what colour is the square?',
                                 dict(max_new_tokens=4, do_sample=False), return_history=True)
    assert history == [('<image>\nwhat colour is the square?', answer)]
    prompt = model.build_prompt('<image>\nwhat colour is the square?', num_patches_list=[1])
    assert prompt.count(IMG_CONTEXT_TOKEN) == 4 and prompt.endswith('<|im_start|>assistant\n')
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors='pt')['input_ids']
    expected = _greedy_by_hand(model, ids, pixels, 4, model.stop_token_ids(tokenizer))
    assert answer == tokenizer.decode(expected, skip_special_tokens=True).split('<|im_end|>')[0].strip()
    assert len(expected) > 0

    answer2, history2 = model.chat(tokenizer, pixels, 'and the background?', dict(max_new_tokens=2), history=history,
                                   return_history=True)
    assert len(history2) == 2 and history2[1] == ('and the background?', answer2)
    with pytest.raises(ValueError, match='adds up to 1 tiles but pixel_values has 2'):
        model.chat(tokenizer, torch.randn(2, 3, 56, 56), 'hi', num_patches_list=[1])
