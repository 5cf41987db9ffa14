"""Templates byte-identical to the published renderings, chat() as published, tiling tie-break, added tokens."""
import pytest
import torch

from chat import ChatSettings, InternVLChatModel, choose_grid, get_template
from chat.conversation import ASSISTANT, USER
from chat.preprocess import candidate_grids
from chat.tiny import build_tiny_parts, build_tiny_sp_tokenizer
from chat.tokenization import ADDED_TOKENS, prepare_tokenizer

SYS = '你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。'
SYS25 = '你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。'
Q1 = '<image>\n<image>\nwhat differs?'
# Two images, an answered turn, a turn with an empty answer (kept in a history: role marker only, no separator),
# and the question to be answered.
EXPECTED = {
    'internvl_zh': f' <human>: {Q1} <bot>: the colour.</s><human>: and the shape? <bot>:<human>: which is red? <bot>:',
    'Hermes-2': (f'<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\n{Q1}<|im_end|><|im_start|>assistant\n'
                 'the colour.<|im_end|><|im_start|>user\nand the shape?<|im_end|><|im_start|>assistant\n'
                 '<|im_start|>user\nwhich is red?<|im_end|><|im_start|>assistant\n'),
    'internlm2-chat': (f'<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\n{Q1}<|im_end|><|im_start|>assistant\n'
                       'the colour.<|im_end|><|im_start|>user\nand the shape?<|im_end|><|im_start|>assistant\n'
                       '<|im_start|>user\nwhich is red?<|im_end|><|im_start|>assistant\n'),
    'phi3-chat': (f'<|system|>\n{SYS}<|end|><|user|>\n{Q1}<|end|><|assistant|>\nthe colour.<|end|><|user|>\n'
                  'and the shape?<|end|><|assistant|>\n<|user|>\nwhich is red?<|end|><|assistant|>\n'),
    'internvl2_5': (f'<|im_start|>system\n{SYS25}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n'
                    'the colour.<|im_end|>\n<|im_start|>user\nand the shape?<|im_end|>\n<|im_start|>assistant\n'
                    '<|im_start|>user\nwhich is red?<|im_end|>\n<|im_start|>assistant\n'),
}


@pytest.mark.parametrize('name', list(EXPECTED))
def test_template_renders_byte_identical_to_the_published_one(name):
    conv = get_template(name).conversation()
    for role, text in [(USER, Q1), (ASSISTANT, 'the colour.'), (USER, 'and the shape?'), (ASSISTANT, ''),
                       (USER, 'which is red?'), (ASSISTANT, None)]:
        conv.append(role, text)
    assert conv.prompt() == EXPECTED[name]


def test_stop_text_is_the_separator_token():
    assert {n: get_template(n).stop_str for n in EXPECTED} == {
        'internvl_zh': '</s>', 'Hermes-2': '<|im_end|>', 'internlm2-chat': '<|im_end|>', 'phi3-chat': '<|end|>',
        'internvl2_5': '<|im_end|>'}


def test_prepare_tokenizer_adds_the_nine_published_tokens_in_order():
    tokenizer = build_tiny_sp_tokenizer()
    base = len(tokenizer)
    added = prepare_tokenizer(tokenizer, 'phi3-chat')
    assert added == ['<img>', '</img>', '<IMG_CONTEXT>', '<quad>', '</quad>', '<ref>', '</ref>', '<box>', '</box>',
                     '<|system|>', '<|user|>', '<|assistant|>', '<|end|>']
    assert tokenizer.convert_tokens_to_ids(list(ADDED_TOKENS)) == list(range(base, base + 9))


def test_tiling_tie_break_follows_the_published_grid_order():
    # min 4 = max 4: 4x1 (aspect 4) and 2x2 (aspect 1) are equally far from 2.5; the published candidate order is
    # 4x1, 1x4, 2x2, so a small image keeps 4x1 and an image with more than half of 4 tiles' pixels takes 2x2
    assert candidate_grids(4, 4) == [(4, 1), (1, 4), (2, 2)]
    assert choose_grid(200, 80, 448, 4, 4) == (4, 1)
    assert choose_grid(2000, 800, 448, 4, 4) == (2, 2)
    assert candidate_grids(2, 6) == [(1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1),
                                     (2, 3), (1, 6), (3, 2)]


def test_max_dynamic_patch_defaults_to_six_as_published():
    assert ChatSettings().max_dynamic_patch == 6
    assert ChatSettings.from_config({}).max_dynamic_patch == 6


@pytest.fixture(scope='module')
def tiny_model():
    backbone, llm, _ = build_tiny_parts(image_size=56)
    return backbone, llm


def test_chat_encodes_with_bos_stops_at_the_separator_and_prepends_one_image(tiny_model, monkeypatch):
    backbone, llm = tiny_model
    tokenizer = build_tiny_sp_tokenizer(add_bos=True)
    prepare_tokenizer(tokenizer, 'internvl_zh')
    llm.resize_token_embeddings(len(tokenizer))
    model = InternVLChatModel(backbone, llm, ChatSettings(template='internvl_zh'))
    calls = []
    answer_ids = tokenizer(' the square is red.', add_special_tokens=False)['input_ids']
    eos = tokenizer.convert_tokens_to_ids('</s>')

    def fake_generate(input_ids, pixel_values=None, attention_mask=None, **kwargs):
        calls.append((input_ids, pixel_values, kwargs))
        return torch.tensor([answer_ids + [eos]])  # generate stops at eos_token_id

    monkeypatch.setattr(model, 'generate', fake_generate)
    pixels = torch.randn(1, 3, 56, 56)
    answer = model.chat(tokenizer, pixels, 'what colour?', dict(max_new_tokens=8))
    assert answer == 'the square is red.'
    input_ids, _, kwargs = calls[0]
    prompt = ' <human>: <img>' + '<IMG_CONTEXT>' * 4 + '</img>\nwhat colour? <bot>:'
    assert input_ids[0].tolist() == [1] + tokenizer(prompt, add_special_tokens=False)['input_ids']  # <s> first
    assert kwargs['eos_token_id'] == eos and kwargs['max_new_tokens'] == 8

    # with a history, no <image> is put in front (the published check is `history is None`); the image of the
    # first turn is expanded again
    first = ('<image>\nwhat colour?', 'the square is red.')
    answer, history = model.chat(tokenizer, pixels, 'and now?', None, history=[first], return_history=True)
    assert history == [first, ('and now?', 'the square is red.')]
    assert tokenizer.decode(calls[1][0][0]).count('<img>') == 1
