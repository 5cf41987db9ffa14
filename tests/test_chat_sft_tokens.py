"""SFT token ids and labels equal the published InternVL-Chat preprocess_* functions.

Expected values were derived by running the published position arithmetic (``preprocess_mpt`` for Hermes-2,
``preprocess_internlm`` for internlm2-chat, ``preprocess_internvl2_5``) on these records with these tiny tokenizers; labels are written with
None for -100. Records: one image, two images, no image, an answer with a leading space, and a conversation cut at
max_length 40 tokens. 2 image tokens per tile, system message 'be brief.'.
"""
import json

import pytest

from chat.conversation import get_template
from chat.data import SFTDataset, encode_conversation
from chat.tiny import build_tiny_sp_tokenizer, build_tiny_tokenizer, colour_square
from chat.tokenization import prepare_tokenizer

RECORDS = {
    'one_image': {'image': 'red.png', 'conversations': [
        {'from': 'human', 'value': '<image>\nwhat colour is the square?'},
        {'from': 'gpt', 'value': 'the square is red.'}]},
    'two_images': {'image': ['red.png', 'blue.png'], 'conversations': [
        {'from': 'human', 'value': '<image>\n<image>\nwhich shape is shown?'}, {'from': 'gpt', 'value': 'a square.'},
        {'from': 'human', 'value': 'what colour is the square?'}, {'from': 'gpt', 'value': 'the square is blue.'}]},
    'no_image': {'conversations': [{'from': 'human', 'value': 'hello, how are you?'},
                                   {'from': 'gpt', 'value': 'i am fine, thank you.'}]},
    'leading_space': {'image': 'red.png', 'conversations': [
        {'from': 'human', 'value': 'what colour is the square?'},  # <image>\n is put in front, as published
        {'from': 'gpt', 'value': ' the square is green.'}]},
    'over_long': {'image': 'red.png', 'conversations': [
        {'from': 'human', 'value': '<image>\nwhat colour is the square?'}, {'from': 'gpt', 'value': 'the square is red.'},
        {'from': 'human', 'value': 'describe the image.'}, {'from': 'gpt', 'value': 'a square on a grey background.'}]},
}

# SentencePiece-style tokenizer (word-start piece prepended to every text), no BOS: published preprocess_mpt
SP_HERMES2 = {
    'one_image': ([3, 145, 5, 85, 63, 31, 22, 18, 19, 8, 4, 3, 75, 5, 160, 162, 162, 161, 40, 156, 77, 140, 50, 51, 122, 4, 3, 82, 155, 45, 49, 50, 139, 4],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 45, 49, 50, 139, 4]),
    'two_images': ([3, 145, 5, 85, 63, 31, 22, 18, 19, 8, 4, 3, 75, 5, 160, 162, 162, 161, 40, 5, 160, 162, 162, 161, 40, 156, 69, 86, 143, 50, 144, 4, 3, 82, 5, 14, 121, 4, 3, 75, 156, 77, 140, 50, 51, 122, 4, 3, 82, 155, 45, 49, 50, 150, 4],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 14, 121, 4, None, None, None, None, None, None, None, None, None, None, None, None, 45, 49, 50, 150, 4]),
    'no_image': ([3, 145, 5, 85, 63, 31, 22, 18, 19, 8, 4, 3, 75, 5, 45, 78, 7, 111, 110, 134, 4, 3, 82, 5, 22, 123, 142, 147, 133, 4],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 22, 123, 142, 147, 133, 4]),
    'leading_space': ([3, 145, 5, 85, 63, 31, 22, 18, 19, 8, 4, 3, 75, 5, 160, 162, 162, 161, 40, 156, 77, 140, 50, 51, 122, 4, 3, 82, 5, 51, 49, 50, 152, 4],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 51, 49, 50, 152, 4]),
    'over_long': ([3, 145, 5, 85, 63, 31, 22, 18, 19, 8, 4, 3, 75, 5, 160, 162, 162, 161, 40, 156, 77, 140, 50, 51, 122, 4, 3, 82, 155, 45, 49, 50, 139, 4, 3, 75, 5, 89, 138, 51],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 45, 49, 50, 139, 4, None, None, None, None, None, None]),
}

# byte-level BPE: published preprocess_mpt
BPE_HERMES2 = {
    'one_image': ([366, 340, 200, 284, 276, 83, 74, 70, 71, 15, 367, 366, 313, 200, 357, 359, 359, 358, 200, 342, 345, 267, 277, 265, 32, 367, 366, 355, 200, 266, 265, 267, 344, 15, 367],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 266, 265, 267, 344, 15, 367]),
    'two_images': ([366, 340, 200, 284, 276, 83, 74, 70, 71, 15, 367, 366, 313, 200, 357, 359, 359, 358, 200, 357, 359, 359, 358, 200, 343, 349, 267, 350, 32, 367, 366, 355, 200, 66, 265, 15, 367, 366, 313, 200, 342, 345, 267, 277, 265, 32, 367, 366, 355, 200, 266, 265, 267, 354, 15, 367],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 66, 265, 15, 367, None, None, None, None, None, None, None, None, None, None, None, None, None, 266, 265, 267, 354, 15, 367]),
    'no_image': ([366, 340, 200, 284, 276, 83, 74, 70, 71, 15, 367, 366, 313, 200, 351, 13, 318, 317, 279, 32, 367, 366, 355, 200, 74, 329, 346, 13, 348, 279, 15, 367],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 74, 329, 346, 13, 348, 279, 15, 367]),
    'leading_space': ([366, 340, 200, 284, 276, 83, 74, 70, 71, 15, 367, 366, 313, 200, 357, 359, 359, 358, 200, 342, 345, 267, 277, 265, 32, 367, 366, 355, 200, 277, 265, 267, 333, 15, 367],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 277, 265, 267, 333, 15, 367]),
    'over_long': ([366, 340, 200, 284, 276, 83, 74, 70, 71, 15, 367, 366, 313, 200, 357, 359, 359, 358, 200, 342, 345, 267, 277, 265, 32, 367, 366, 355, 200, 266, 265, 267, 344, 15, 367, 366, 313, 200, 356, 277],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 266, 265, 267, 344, 15, 367, None, None, None, None, None]),
}

# SentencePiece-style tokenizer that adds <s> (as InternLM2's): published preprocess_internlm (messages stripped)
SP_BOS_INTERNLM2 = {
    'one_image': ([1, 3, 145, 5, 85, 63, 31, 22, 18, 19, 8, 4, 3, 75, 5, 160, 162, 162, 161, 40, 156, 77, 140, 50, 51, 122, 4, 3, 82, 155, 45, 49, 50, 139, 4],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 45, 49, 50, 139, 4]),
    'two_images': ([1, 3, 145, 5, 85, 63, 31, 22, 18, 19, 8, 4, 3, 75, 5, 160, 162, 162, 161, 40, 5, 160, 162, 162, 161, 40, 156, 69, 86, 143, 50, 144, 4, 3, 82, 5, 14, 121, 4, 3, 75, 156, 77, 140, 50, 51, 122, 4, 3, 82, 155, 45, 49, 50, 150, 4],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 14, 121, 4, None, None, None, None, None, None, None, None, None, None, None, None, 45, 49, 50, 150, 4]),
    'no_image': ([1, 3, 145, 5, 85, 63, 31, 22, 18, 19, 8, 4, 3, 75, 5, 45, 78, 7, 111, 110, 134, 4, 3, 82, 5, 22, 123, 142, 147, 133, 4],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 22, 123, 142, 147, 133, 4]),
    'leading_space': ([1, 3, 145, 5, 85, 63, 31, 22, 18, 19, 8, 4, 3, 75, 5, 160, 162, 162, 161, 40, 156, 77, 140, 50, 51, 122, 4, 3, 82, 155, 45, 49, 50, 152, 4],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 45, 49, 50, 152, 4]),
    'over_long': ([1, 3, 145, 5, 85, 63, 31, 22, 18, 19, 8, 4, 3, 75, 5, 160, 162, 162, 161, 40, 156, 77, 140, 50, 51, 122, 4, 3, 82, 155, 45, 49, 50, 139, 4, 3, 75, 5, 89, 138],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 45, 49, 50, 139, 4, None, None, None, None, None]),
}

# byte-level BPE (Qwen2-style, no BOS): published preprocess_internvl2_5 (each message tokenized on its own)
BPE_INTERNVL2_5 = {
    'one_image': ([366, 340, 200, 284, 276, 83, 74, 70, 71, 15, 367, 200, 366, 313, 200, 357, 359, 359, 358, 200, 342, 345, 267, 277, 265, 32, 367, 200, 366, 355, 200, 266, 265, 267, 344, 15, 367, 200],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 266, 265, 267, 344, 15, 367, None]),
    'two_images': ([366, 340, 200, 284, 276, 83, 74, 70, 71, 15, 367, 200, 366, 313, 200, 357, 359, 359, 358, 200, 357, 359, 359, 358, 200, 343, 349, 267, 350, 32, 367, 200, 366, 355, 200, 66, 265, 15, 367, 200, 366, 313, 200, 342, 345, 267, 277, 265, 32, 367, 200, 366, 355, 200, 266, 265, 267, 354, 15, 367, 200],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 66, 265, 15, 367, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 266, 265, 267, 354, 15, 367, None]),
    'no_image': ([366, 340, 200, 284, 276, 83, 74, 70, 71, 15, 367, 200, 366, 313, 200, 351, 13, 318, 317, 279, 32, 367, 200, 366, 355, 200, 74, 329, 346, 13, 348, 279, 15, 367, 200],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 74, 329, 346, 13, 348, 279, 15, 367, None]),
    'leading_space': ([366, 340, 200, 284, 276, 83, 74, 70, 71, 15, 367, 200, 366, 313, 200, 357, 359, 359, 358, 200, 342, 345, 267, 277, 265, 32, 367, 200, 366, 355, 200, 277, 265, 267, 333, 15, 367, 200],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 277, 265, 267, 333, 15, 367, None]),
    'over_long': ([366, 340, 200, 284, 276, 83, 74, 70, 71, 15, 367, 200, 366, 313, 200, 357, 359, 359, 358, 200, 342, 345, 267, 277, 265, 32, 367, 200, 366, 355, 200, 266, 265, 267, 344, 15, 367, 200, 366, 313],
        [None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, 266, 265, 267, 344, 15, 367, None, None, None]),
}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('sft')
    colour_square('red', 32).save(root / 'red.png')
    colour_square('blue', 32).save(root / 'blue.png')
    for name, record in RECORDS.items():
        (root / f'{name}.jsonl').write_text(json.dumps(record) + '\n')
    return root


def items(data_dir, tokenizer, template, name):
    ds = SFTDataset(data_dir / f'{name}.jsonl', tokenizer, num_image_token=2, tile_size=28, template=template,
                    system_message='be brief.', max_length=40 if name == 'over_long' else 4096, on_bad_record='error')
    item = ds[0]
    return item['input_ids'].tolist(), [None if x == -100 else x for x in item['labels'].tolist()]


@pytest.mark.parametrize('name', list(RECORDS))
@pytest.mark.parametrize('build,template,expected', [
    (lambda: build_tiny_sp_tokenizer(), 'Hermes-2', SP_HERMES2),
    (build_tiny_tokenizer, 'Hermes-2', BPE_HERMES2),
    (lambda: build_tiny_sp_tokenizer(add_bos=True), 'internlm2-chat', SP_BOS_INTERNLM2),
    (build_tiny_tokenizer, 'internvl2_5', BPE_INTERNVL2_5),
], ids=['sentencepiece-Hermes-2', 'bpe-Hermes-2', 'sentencepiece-bos-internlm2-chat', 'bpe-internvl2_5'])
def test_sft_ids_and_labels_equal_the_published_preprocessing(data_dir, build, template, expected, name):
    tokenizer = build()
    prepare_tokenizer(tokenizer, template)
    assert items(data_dir, tokenizer, template, name) == expected[name]


def test_bos_tokenizer_with_hermes2_keeps_published_ids_and_supervises_every_answer(data_dir):
    """The documented exception: the published preprocess_mpt counts <s> once per turn, reports a tokenization
    mismatch and masks the whole two-round record; the ids stay the published ones (<s> + the same text tokens),
    and both answers are supervised."""
    tokenizer = build_tiny_sp_tokenizer(add_bos=True)
    prepare_tokenizer(tokenizer, 'Hermes-2')
    ids, labels = items(data_dir, tokenizer, 'Hermes-2', 'two_images')
    expected_ids, expected_labels = SP_HERMES2['two_images']
    assert ids == [1] + expected_ids
    assert labels == [None] + expected_labels


def test_internvl_zh_supervises_the_space_before_the_answer_and_the_eos():
    """V1-1: labels are ' ' + answer + '</s>' (the published V1-1 preprocess keeps the answer's word-start piece)."""
    tokenizer = build_tiny_sp_tokenizer(add_bos=True)
    prepare_tokenizer(tokenizer, 'internvl_zh')
    conv = get_template('internvl_zh').conversation()
    conv.append(0, 'hello, how are you?').append(1, 'i am fine, thank you.')
    ids, labels = encode_conversation(tokenizer, conv)
    assert tokenizer.convert_ids_to_tokens(ids) == [
        '<s>', '▁<', 'hu', 'man', '>:', '▁hello,', '▁how', '▁are', '▁you?', '▁<', 'bo', 't', '>:', '▁i', '▁am',
        '▁fine,', '▁thank', '▁you.', '</s>']
    assert tokenizer.convert_ids_to_tokens([x for x in labels if x != -100]) == [
        '▁i', '▁am', '▁fine,', '▁thank', '▁you.', '</s>']
