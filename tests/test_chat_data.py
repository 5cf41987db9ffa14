"""SFT data: label masking, templates, truncation, bad records, preprocessing (tiles), collation."""
import json
import re

import pytest
import torch
from PIL import Image

from chat import IMAGENET_MEAN, IMAGENET_STD, choose_grid, dynamic_tiles, get_template, load_image
from chat.conversation import ASSISTANT, USER
from chat.data import BadRecordError, SFTCollator, SFTDataset
from chat.tiny import build_tiny_tokenizer, colour_square
from chat.tokenization import prepare_tokenizer

N_TOKENS = 4  # image tokens per tile in these tests


@pytest.fixture(scope='module')
def tokenizer():
    tok = build_tiny_tokenizer()
    prepare_tokenizer(tok, 'Hermes-2')
    return tok


@pytest.fixture()
def images(tmp_path):
    (tmp_path / 'img').mkdir()
    colour_square('red', 64).save(tmp_path / 'img' / 'red.png')
    colour_square('blue', 64).save(tmp_path / 'img' / 'blue.png')
    (tmp_path / 'img' / 'broken.png').write_bytes(b'not an image')
    return tmp_path


def write_jsonl(path, records):
    path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records))
    return path


def conv(*turns, image=None, **extra):
    record = {'conversations': [{'from': f, 'value': v} for f, v in turns], **extra}
    if image is not None:
        record['image'] = image
    return record


def dataset(path, tokenizer, **kwargs):
    kwargs = {'num_image_token': N_TOKENS, 'tile_size': 28, 'system_message': 'be brief.', 'record_rules': 'strict',
              'truncation': 'turns', **kwargs}
    return SFTDataset(path, tokenizer, **kwargs)


def kept_text(tokenizer, item):
    return tokenizer.decode([t for t, lab in zip(item['input_ids'].tolist(), item['labels'].tolist()) if lab != -100])


# ---------------------------------------------------------------------------------------------------- masking
def test_hermes2_prompt_and_labels_on_answers_only(images, tokenizer):
    path = write_jsonl(images / 'd.jsonl', [conv(('human', 'what colour?'), ('gpt', 'red.'),
                                                 ('human', 'sure?'), ('gpt', 'yes.'), image='img/red.png')])
    ds = dataset(path, tokenizer)
    item = ds[0]
    ctx = '<IMG_CONTEXT>' * N_TOKENS
    expected = ('<|im_start|>system\nbe brief.<|im_end|>'
                '<|im_start|>user\n<image>\nwhat colour?<|im_end|><|im_start|>assistant\nred.<|im_end|>'
                '<|im_start|>user\nsure?<|im_end|><|im_start|>assistant\nyes.<|im_end|>').replace(
                    '<image>', f'<img>{ctx}</img>')
    assert tokenizer.decode(item['input_ids']) == expected
    assert kept_text(tokenizer, item) == 'red.<|im_end|>yes.<|im_end|>'
    # every unmasked label equals its input id (the LLM shifts them itself)
    keep = item['labels'] != -100
    assert torch.equal(item['labels'][keep], item['input_ids'][keep])
    assert item['pixel_values'].shape == (1, 3, 28, 28) and item['image_flags'].tolist() == [1]


def test_plain_template_and_text_only_record(images, tokenizer):
    path = write_jsonl(images / 'd.jsonl', [conv(('human', 'describe.'), ('gpt', 'a square.'))])
    item = dataset(path, tokenizer, template='plain', system_message=None)[0]
    assert tokenizer.decode(item['input_ids']) == 'describe.\na square.\n'
    assert kept_text(tokenizer, item) == 'a square.\n'
    # text only: one blank placeholder tile with flag 0
    assert item['pixel_values'].shape == (1, 3, 28, 28) and item['image_flags'].tolist() == [0]
    assert not item['pixel_values'].any()


def test_conversation_blocks_mark_targets():
    c = get_template('Hermes-2').conversation('sys')
    c.append(USER, 'q').append(ASSISTANT, 'a').append(USER, 'q2').append(ASSISTANT, None)
    [block] = c.blocks()
    assert block.text == ('<|im_start|>system\nsys<|im_end|><|im_start|>user\nq<|im_end|><|im_start|>assistant\n'
                          'a<|im_end|><|im_start|>user\nq2<|im_end|><|im_start|>assistant\n')
    assert [block.text[s:e] for s, e in block.targets] == ['a<|im_end|>']
    assert c.clean_answer(' blue <|im_end|> junk') == 'blue'


def test_images_without_placeholder_go_before_the_first_question(images, tokenizer):
    path = write_jsonl(images / 'd.jsonl', [conv(('human', 'compare.'), ('gpt', 'different.'),
                                                 image=['img/red.png', 'img/blue.png'])])
    item = dataset(path, tokenizer)[0]
    text = tokenizer.decode(item['input_ids'])
    ctx = '<IMG_CONTEXT>' * N_TOKENS
    assert f'user\n<img>{ctx}</img>\n<img>{ctx}</img>\ncompare.' in text
    assert item['pixel_values'].shape == (2, 3, 28, 28)
    assert item['pixel_values'][0].mean() != item['pixel_values'][1].mean()  # red first, then blue


# ---------------------------------------------------------------------------------------------------- length
def test_truncation_drops_whole_trailing_rounds(images, tokenizer):
    long_answer = 'the square is red. ' * 20
    record = conv(('human', 'what colour?'), ('gpt', 'red.'), ('human', 'again?'), ('gpt', long_answer),
                  image='img/red.png')
    path = write_jsonl(images / 'd.jsonl', [record])
    full = dataset(path, tokenizer, max_length=4096)
    limit = full.examples[0].num_tokens - 5
    cut = dataset(path, tokenizer, max_length=limit)
    ex = cut.examples[0]
    assert ex.dropped_rounds == 1 and len(ex.turns) == 2
    item = cut[0]
    assert item['input_ids'].numel() == ex.num_tokens <= limit
    assert kept_text(tokenizer, item) == 'red.<|im_end|>'

    with pytest.raises(BadRecordError, match=r'd.jsonl record 0 \(line 1\): too long: \d+ tokens > max_length'):
        dataset(path, tokenizer, max_length=limit, truncation='none', on_bad_record='error')
    with pytest.raises(BadRecordError, match='the first round alone takes'):
        dataset(path, tokenizer, max_length=20, on_bad_record='error')


# ---------------------------------------------------------------------------------------------------- bad records
BAD = [
    ('{"conversations": [', 'invalid JSON'),
    ('[1, 2]', 'a record must be a JSON object, got list'),
    (conv(), "no 'conversations' list"),
    (conv(('human', 'hello?')), 'no assistant turn'),
    (conv(('human', 'q'), ('gpt', 'a'), ('human', 'q2')), 'the last question has no answer'),
    (conv(('system', 'hi'), ('gpt', 'hello')), "turn 1 is from 'gpt' but a user turn was expected"),
    (conv(('human', 'q'), ('bot', 'a')), "turn 1 has role 'bot'"),
    (conv(('human', '<image>\nq'), ('gpt', 'a'), image='img/missing.png'), 'image not found: .*missing.png'),
    (conv(('human', '<image> <image> q'), ('gpt', 'a'), image='img/red.png'), '2 <image> placeholders for 1 images'),
    (conv(('human', 'look: <IMG_CONTEXT>'), ('gpt', 'a')), 'contains the reserved token <IMG_CONTEXT>'),
    (conv(('human', 'q ' * 200), ('gpt', 'a')), 'too long'),
]


def test_each_bad_record_is_reported_with_its_index(images, tokenizer):
    good = conv(('human', 'what colour?'), ('gpt', 'red.'), image='img/red.png', id='good')
    records = [good] + [r for r, _ in BAD] + [good]
    path = write_jsonl(images / 'd.jsonl', records)
    report = images / 'out' / 'bad.jsonl'
    ds = dataset(path, tokenizer, max_length=120, report_file=report)
    assert len(ds) == 2 and [ex.index for ex in ds.examples] == [0, len(records) - 1]
    assert [b.index for b in ds.bad_records] == list(range(1, len(BAD) + 1))
    for bad, (_, reason) in zip(ds.bad_records, BAD):
        assert bad.line == bad.index + 1
        assert re.search(reason, bad.reason), (bad.reason, reason)
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert [(entry['index'], entry['reason']) for entry in lines] == [(b.index, b.reason) for b in ds.bad_records]

    for k, (record, reason) in enumerate(BAD, 1):
        with pytest.raises(BadRecordError, match=rf'record {k} \(line {k + 1}\).*{reason}'):
            dataset(write_jsonl(images / 'one.jsonl', [good] * k + [record, good]), tokenizer, max_length=120,
                    on_bad_record='error')


def test_unreadable_image_and_json_list_files(images, tokenizer):
    records = [conv(('human', 'q'), ('gpt', 'a'), image='img/broken.png', id='x7'),
               conv(('human', 'q'), ('gpt', 'a'), image='img/red.png')]
    path = images / 'd.json'
    path.write_text(json.dumps(records))
    with pytest.raises(BadRecordError, match=r"d.json record 0 id='x7': cannot read image .*broken.png"):
        dataset(path, tokenizer, dynamic=True, max_tiles=4, on_bad_record='error')
    ds = dataset(path, tokenizer, dynamic=True, max_tiles=4)
    assert len(ds) == 1 and ds.bad_records[0].line is None
    with pytest.raises(ValueError, match='no usable SFT records'):
        dataset(write_jsonl(images / 'bad.jsonl', [records[0]]), tokenizer)  # fixed resolution checks headers too


def test_collator_pads_right_and_concatenates_tiles(images, tokenizer):
    path = write_jsonl(images / 'd.jsonl', [conv(('human', 'what colour?'), ('gpt', 'red.'), image='img/red.png'),
                                            conv(('human', 'hi'), ('gpt', 'a much longer answer than that.'))])
    ds = dataset(path, tokenizer)
    batch = SFTCollator(tokenizer)([ds[0], ds[1]])
    n0, n1 = ds[0]['input_ids'].numel(), ds[1]['input_ids'].numel()
    length = max(n0, n1)
    assert batch['input_ids'].shape == batch['labels'].shape == batch['attention_mask'].shape == (2, length)
    assert batch['attention_mask'].sum(1).tolist() == [n0, n1]
    short = 0 if n0 < n1 else 1
    assert (batch['labels'][short, min(n0, n1):] == -100).all()
    assert (batch['input_ids'][short, min(n0, n1):] == tokenizer.pad_token_id).all()
    assert batch['pixel_values'].shape == (2, 3, 28, 28) and batch['image_flags'].tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------------- preprocessing
def test_choose_grid_by_aspect_ratio():
    assert choose_grid(800, 400, max_tiles=6) == (2, 1)
    assert choose_grid(400, 1200, max_tiles=6) == (1, 3)
    assert choose_grid(1000, 1000, max_tiles=6) == (2, 2)  # tie with 1x1: big enough for 4 tiles
    assert choose_grid(300, 300, max_tiles=6) == (1, 1)  # tie, but under half of 2x2 tiles' pixels
    assert choose_grid(4000, 100, max_tiles=12) == (12, 1)
    with pytest.raises(ValueError, match='need 1 <= min_tiles <= max_tiles'):
        choose_grid(10, 10, min_tiles=3, max_tiles=2)


def test_dynamic_tiles_cut_row_major_and_add_thumbnail():
    img = Image.new('RGB', (56, 28))
    img.paste((255, 0, 0), (0, 0, 28, 28))
    img.paste((0, 0, 255), (28, 0, 56, 28))
    tiles = dynamic_tiles(img, tile_size=28, max_tiles=4, use_thumbnail=True)
    assert len(tiles) == 3  # 2x1 grid + thumbnail
    assert tiles[0].getpixel((14, 14)) == (255, 0, 0) and tiles[1].getpixel((14, 14)) == (0, 0, 255)
    assert tiles[2].size == (28, 28)
    pixels = load_image(img, tile_size=28, dynamic=True, max_tiles=4, use_thumbnail=False)
    assert pixels.shape == (2, 3, 28, 28)
    red = torch.tensor([(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
                        (0 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]])
    assert torch.allclose(pixels[0, :, 14, 14], red, atol=1e-5)
    assert load_image(img, tile_size=28).shape == (1, 3, 28, 28)  # fixed resolution: one resized tile
