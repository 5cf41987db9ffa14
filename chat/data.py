"""Supervised fine-tuning data: LLaVA-style JSONL records -> token ids, masked labels and image tiles.

A record::

    {"id": "0001", "image": "images/0001.jpg",            # or a list of paths, or absent / "" for text only
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                       {"from": "gpt", "value": "A red square."}, ...]}

Data come as the published meta file (``--meta_path``, ``load_meta_file``): a JSON object of datasets, each with
``root`` (image folder), ``annotation`` (a .jsonl file), ``data_augment``, ``repeat_time`` (2: every record twice;
0.5: the first half of the file) and ``length``, optionally ``max_dynamic_patch``; or as the project's simple
form, ``--data FILE.jsonl [--image_root DIR]`` (default root: the file's folder).

Tokenization (``encode_conversation``): the whole rendered conversation is tokenized once and the labels are set
by position, giving the ``input_ids`` and labels of the published ``preprocess_*`` functions (see
``chat.conversation`` for what is supervised; the deliberate difference, records whose published position
arithmetic miscounts and which the published code therefore masks whole, is described in README).

``record_rules='published'`` (default) reads records as the published code does: a leading answer is dropped, a
single image without ``<image>`` goes in front of the first turn, ``"image": ""`` is a text-only record; a leading
``system`` turn is the system message with ``internvl2_5`` (which also takes turns in any order, as its published
function) and makes the record bad with every other template (the published code fails on it). ``'strict'``:
the project's stricter rules (roles must alternate from the first turn, a leading ``system`` turn is the system
message, the record must end with an answer, no reserved tokens in the text, one ``<image>`` per image).

Maximum length: ``truncation='tokens'`` (default, published) cuts the token sequence at ``max_length``; a record
whose cut falls inside or before an image is bad. ``'turns'`` keeps as many whole leading rounds as fit (a record
whose first round alone is too long is bad); ``'none'``: every over-long record is bad.

Bad records -- invalid JSON, a wrong structure, a missing or unreadable image, too few ``<image>`` placeholders,
an image cut off -- are found when the dataset is built (a scan that reads image headers, not pixels) and
reported with the file, the record's index (0-based; JSONL also gives the line) and the reason. An image that
fails to decode during training is a bad record too (replaced by a record drawn at random, seeded, as
published). ``on_bad_record='skip'`` leaves them out and logs a summary (and writes ``report_file`` if given);
``'error'`` stops at the first one.
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from backbones.atomic import atomic_write

from .conversation import ASSISTANT, USER, get_template
from .model import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, image_token_text
from .preprocess import count_tiles, load_image
from .tokenization import pad_token_id

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = {'human': USER, 'user': USER, 'gpt': ASSISTANT, 'assistant': ASSISTANT}
RESERVED = (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
ON_BAD_RECORD = ('skip', 'error')
TRUNCATION = ('tokens', 'turns', 'none')
RECORD_RULES = ('published', 'strict')
MAX_REPLACEMENTS = 10  # published: a bad record is replaced by up to 10 random draws, then the item fails


@dataclass(frozen=True)
class BadRecord:
    source: str  # the data file
    index: int  # the record's 0-based position in that file
    reason: str
    line: int | None = None  # JSONL: the 1-based line
    record_id: str | None = None

    def __str__(self) -> str:
        where = f'{self.source} record {self.index}' + (f' (line {self.line})' if self.line else '')
        ident = f' id={self.record_id!r}' if self.record_id is not None else ''
        return f'{where}{ident}: {self.reason}'

    def to_json(self) -> dict:
        return {'source': self.source, 'index': self.index, 'line': self.line, 'id': self.record_id,
                'reason': self.reason}


class BadRecordError(ValueError):
    """A bad record met with ``on_bad_record='error'``; ``.record`` is the ``BadRecord``."""

    def __init__(self, record: BadRecord):
        super().__init__(f'{record} (pass --on_bad_record skip to leave bad records out)')
        self.record = record


class _Bad(Exception):
    """Internal: a record is bad for this reason."""


@dataclass
class Example:
    """A record that passed the scan (with ``truncation='turns'``: cut to the rounds that fit)."""

    source: str
    index: int
    system: str | None
    turns: list[tuple[int, str]]
    images: list[Path]
    tiles: list[int]
    max_tiles_per_image: int
    num_tokens: int
    dropped_rounds: int = 0
    truncated_tokens: int = 0
    augment: bool = False  # the meta file's data_augment: JPEG re-compression of each tile


@dataclass(frozen=True)
class DataSource:
    """One annotation file with its image root, as a meta-file entry describes it."""

    annotation: Path
    image_root: Path | None = None  # None: the annotation's folder
    repeat_time: float = 1
    max_dynamic_patch: int | None = None
    data_augment: bool = False
    name: str | None = None

    def __post_init__(self):
        object.__setattr__(self, 'annotation', Path(self.annotation))
        object.__setattr__(self, 'image_root', Path(self.image_root) if self.image_root is not None
                           else self.annotation.parent)
        if not self.repeat_time > 0 or (self.repeat_time > 1 and self.repeat_time != int(self.repeat_time)):
            raise ValueError(f'dataset {self.name or self.annotation}: repeat_time must be a fraction in (0, 1] or '
                             f'a whole number, got {self.repeat_time!r}')

    def records(self) -> list[tuple[int, int | None, Any]]:
        """The file's records, subsampled or repeated by ``repeat_time`` as published (a fraction keeps the
        first ``int(n * repeat_time)`` records; a whole number repeats the list)."""
        records = list(iter_records(self.annotation))
        if self.repeat_time < 1:
            return records[:int(len(records) * self.repeat_time)]
        return records * int(self.repeat_time)


META_KEYS = ('root', 'annotation', 'repeat_time')


def load_meta_file(path: str | os.PathLike) -> list[DataSource]:
    """The datasets of a published meta file (``--meta_path``), in file order."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise FileNotFoundError(f'meta file {path} does not exist') from None
    except json.JSONDecodeError as err:
        raise ValueError(f'meta file {path} is not valid JSON: {err}') from None
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f'meta file {path} must hold a non-empty JSON object of datasets '
                         '({"name": {"root": ..., "annotation": ..., "repeat_time": ...}, ...})')
    sources = []
    for name, entry in meta.items():
        if not isinstance(entry, dict):
            raise ValueError(f'meta file {path}: dataset {name!r} must be an object, got {type(entry).__name__}')
        missing = [k for k in META_KEYS if k not in entry]
        if missing:
            raise ValueError(f'meta file {path}: dataset {name!r} lacks {", ".join(missing)} '
                             f'(each dataset needs {", ".join(META_KEYS)})')
        if not str(entry['annotation']).endswith('.jsonl'):
            raise ValueError(f'meta file {path}: dataset {name!r}: annotation must be a .jsonl file, got '
                             f'{entry["annotation"]!r}')
        try:
            sources.append(DataSource(Path(entry['annotation']), Path(entry['root']), float(entry['repeat_time']),
                                      entry.get('max_dynamic_patch'), bool(entry.get('data_augment', False)),
                                      name))
        except (TypeError, ValueError) as err:
            raise ValueError(f'meta file {path}: {err}') from None
    return sources


def iter_records(path: Path) -> Iterator[tuple[int, int | None, Any]]:
    """``(index, line, record or _Bad)`` for a .json file (a list of records) or a .jsonl file (one per line)."""
    if not path.is_file():
        raise FileNotFoundError(f'data file {path} does not exist')
    if path.suffix == '.jsonl':
        index = 0
        with path.open(encoding='utf-8') as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield index, line_no, json.loads(line)
                except json.JSONDecodeError as err:
                    yield index, line_no, _Bad(f'invalid JSON ({err.msg} at column {err.colno})')
                index += 1
        return
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as err:
        raise ValueError(f'data file {path} is not valid JSON ({err}); use .jsonl for one record per line') from None
    if not isinstance(data, list):
        raise ValueError(f'data file {path} must hold a JSON list of records, found a {type(data).__name__}')
    for index, record in enumerate(data):
        yield index, None, record


def _leading_special_tokens(tokenizer) -> int:
    """How many special tokens (BOS) the tokenizer puts in front of a text by default."""
    plain = tokenizer('a', add_special_tokens=False)['input_ids']
    full = tokenizer('a')['input_ids']
    for lead in range(len(full) - len(plain) + 1):
        if full[lead:lead + len(plain)] == plain:
            return lead
    raise ValueError(f'cannot find the text tokens inside the tokenizer\'s default encoding ({full} vs {plain})')


def encode_conversation(tokenizer, conv) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a rendered conversation, as the published ``preprocess_*`` functions make them.

    The whole rendered text is tokenized once with the tokenizer's default special tokens. Labels keep the tokens
    between the token counts of the rendered prefixes that end where each supervised span starts and ends;
    everything else is -100. This equals the published functions' position arithmetic wherever that arithmetic is
    consistent; where it is not (the published function reports "tokenization mismatch" and masks the whole
    record, see README) the answers are supervised as intended and ``input_ids`` are still the published ones.
    Templates with ``per_message_tokens``: ``_encode_per_message``.
    """
    if conv.template.per_message_tokens:
        return _encode_per_message(tokenizer, conv.blocks())
    (block,) = conv.blocks()
    lead = _leading_special_tokens(tokenizer)
    input_ids = tokenizer(block.text)['input_ids']
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in block.targets:
        a = lead + len(tokenizer(block.text[:start], add_special_tokens=False)['input_ids'])
        b = lead + len(tokenizer(block.text[:end], add_special_tokens=False)['input_ids'])
        labels[a:b] = input_ids[a:b]
    return input_ids, labels


def _encode_per_message(tokenizer, blocks) -> tuple[list[int], list[int]]:
    """The published ``preprocess_internvl2_5``: each message tokenized on its own with the default special tokens
    and the ids concatenated; a tokenizer with ``add_bos_token`` gets its BOS once, in front of the first message.
    An answer supervises its tokens after those of the role marker (tokenized alone) except the message's last
    token (the newline after ``<|im_end|>``; with a SentencePiece tokenizer the ``▁`` before it is supervised)."""
    bos = bool(getattr(tokenizer, 'add_bos_token', False))
    input_ids: list[int] = []
    labels: list[int] = []
    for k, block in enumerate(blocks):
        # published: BOS text in front of the first message, then the first id of every message dropped
        text = tokenizer.bos_token + block.text if bos and k == 0 else block.text
        ids = tokenizer(text)['input_ids'][int(bos):]
        block_labels = [IGNORE_INDEX] * len(ids)
        for start, _ in block.targets:
            a = len(tokenizer(block.text[:start])['input_ids']) - int(bos)
            block_labels[a:len(ids) - 1] = ids[a:len(ids) - 1]
        input_ids += ids
        labels += block_labels
    return input_ids, labels


class SFTDataset(torch.utils.data.Dataset):
    """Validated, tokenized SFT records; items are dicts of tensors for ``SFTCollator``.

    Args:
        data_files: .json (a list of records) or .jsonl files, or ``DataSource`` objects (a meta file's entries).
        tokenizer: a tokenizer holding the image tokens (``chat.tokenization.prepare_tokenizer``).
        num_image_token: LLM tokens per tile (``model.num_image_token``).
        image_root: folder image paths are relative to (default: each data file's folder).
        template: conversation template name; ``system_message`` overrides its system message.
        tile_size, dynamic, min_tiles, max_tiles, use_thumbnail: image preprocessing (``chat.preprocess``);
            with several images in a record each gets ``max(1, max_tiles // n_images)`` tiles at most.
        max_length, truncation, record_rules: see the module docstring.
        on_bad_record: 'skip' or 'error'. report_file: a JSONL file listing the bad records.
        seed: draws the replacement of a record found unreadable during training (``__getitem__``).
    """

    def __init__(self, data_files, tokenizer, *, num_image_token: int, image_root: str | os.PathLike | None = None,
                 template: str = 'Hermes-2', system_message: str | None = None, tile_size: int = 448,
                 dynamic: bool = False, min_tiles: int = 1, max_tiles: int = 6, use_thumbnail: bool = False,
                 max_length: int = 2048, truncation: str = 'tokens', record_rules: str = 'published',
                 on_bad_record: str = 'skip', report_file: str | os.PathLike | None = None, seed: int = 0):
        if on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f'on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}')
        if truncation not in TRUNCATION:
            raise ValueError(f'truncation must be one of {TRUNCATION}, got {truncation!r}')
        if record_rules not in RECORD_RULES:
            raise ValueError(f'record_rules must be one of {RECORD_RULES}, got {record_rules!r}')
        if max_length < 1:
            raise ValueError(f'max_length must be positive, got {max_length}')
        sources = [data_files] if isinstance(data_files, (str, os.PathLike, DataSource)) else list(data_files)
        if not sources:
            raise ValueError('no data files given')
        sources = [s if isinstance(s, DataSource) else DataSource(Path(s), None if image_root is None
                                                                  else Path(image_root)) for s in sources]
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.system_message = system_message
        self.num_image_token = num_image_token
        self.tile_size, self.dynamic, self.use_thumbnail = tile_size, dynamic, use_thumbnail
        self.min_tiles, self.max_tiles = min_tiles, max_tiles
        self.max_length, self.truncation, self.on_bad_record = max_length, truncation, on_bad_record
        self.record_rules = record_rules
        self.seed = seed
        self.report_file = None if report_file is None else Path(report_file)
        self._check_tokenizer()
        self._img_end_id = tokenizer.convert_tokens_to_ids(IMG_END_TOKEN)

        self.examples: list[Example] = []
        self.bad_records: list[BadRecord] = []
        for source in sources:
            for index, line, record in source.records():
                try:
                    if isinstance(record, _Bad):
                        raise record
                    self.examples.append(self._scan(source, index, record))
                except _Bad as reason:
                    bad = BadRecord(str(source.annotation), index, str(reason), line, _record_id(record))
                    if on_bad_record == 'error':
                        raise BadRecordError(bad) from None
                    self.bad_records.append(bad)
        self._report([s.annotation for s in sources])

    @classmethod
    def for_model(cls, model, tokenizer, data_files, **kwargs) -> 'SFTDataset':
        """Preprocessing and template taken from an ``InternVLChatModel``'s settings (kwargs override)."""
        s = model.settings
        defaults = dict(num_image_token=model.num_image_token, template=s.template, tile_size=model.image_size,
                        dynamic=s.dynamic_image_size, min_tiles=s.min_dynamic_patch, max_tiles=s.max_dynamic_patch,
                        use_thumbnail=s.use_thumbnail)
        defaults.update({k: v for k, v in kwargs.items() if v is not None})
        return cls(data_files, tokenizer, **defaults)

    @property
    def lengths(self) -> list[int]:
        """Tokens per example (for ``--group_by_length``)."""
        return [ex.num_tokens for ex in self.examples]

    # ------------------------------------------------------------------------------------------- scanning
    def _check_tokenizer(self) -> None:
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in RESERVED + self.template.special_tokens if t not in vocab]
        if missing:
            raise ValueError(f'the tokenizer lacks {", ".join(missing)}; run chat.tokenization.prepare_tokenizer')

    def _scan(self, source: 'DataSource', index: int, record: Any) -> Example:
        if not isinstance(record, dict):
            raise _Bad(f'a record must be a JSON object, got {type(record).__name__}')
        strict = self.record_rules == 'strict'
        images = self._images(source, record)
        if strict:
            system, turns = self._parse_turns(record)
            placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
            if images and placeholders == 0:
                turns[0] = (USER, (IMAGE_PLACEHOLDER + '\n') * len(images) + turns[0][1])
            elif placeholders != len(images):
                raise _Bad(f'{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images')
        else:
            system, turns = self._published_turns(record, images)
            placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
            if placeholders < len(images):
                raise _Bad(f'{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images')
        per_image = max(1, (source.max_dynamic_patch or self.max_tiles) // max(1, len(images)))
        tiles = [self._count_tiles(path, per_image) for path in images]
        example = Example(str(source.annotation), index, system, turns, images, tiles, per_image, num_tokens=0,
                          augment=source.data_augment)
        input_ids, labels = self._encode_full(example)
        total = len(input_ids)
        if strict and not any(lab != IGNORE_INDEX for lab in labels):
            raise _Bad('no supervised token (every answer is empty)')
        if total > self.max_length:
            if self.truncation == 'none':
                raise _Bad(f'too long: {total} tokens > max_length {self.max_length}')
            if self.truncation == 'turns':
                return self._drop_rounds(example, total)
            # 'tokens' (published): the sequence is cut; an image cut off makes the record bad
            complete = input_ids[:self.max_length].count(self._img_end_id)
            if complete < len(images):
                raise _Bad(f'too long: {total} tokens > max_length {self.max_length} cuts off image '
                           f'{complete + 1} of {len(images)}')
            example.truncated_tokens = total - self.max_length
        example.num_tokens = min(total, self.max_length)
        return example

    def _drop_rounds(self, example: Example, total: int) -> Example:
        """'turns': keep as many whole leading rounds (question + answer) as fit."""
        turns = example.turns
        for kept in range(len(turns) // 2 - 1, 0, -1):
            shorter = turns[:2 * kept]
            n_images = sum(text.count(IMAGE_PLACEHOLDER) for _, text in shorter)
            candidate = Example(example.source, example.index, example.system, shorter, example.images[:n_images],
                                example.tiles[:n_images], example.max_tiles_per_image, 0,
                                dropped_rounds=(len(turns) - len(shorter)) // 2, augment=example.augment)
            length = len(self._encode_full(candidate)[0])
            if length <= self.max_length:
                candidate.num_tokens = length
                return candidate
        first = Example(example.source, example.index, example.system, turns[:2], [], [], 1, 0)
        first.images = example.images[:sum(t.count(IMAGE_PLACEHOLDER) for _, t in turns[:2])]
        first.tiles = example.tiles[:len(first.images)]
        raise _Bad(f'too long: {total} tokens, and the first round alone takes '
                   f'{len(self._encode_full(first)[0])} > max_length {self.max_length}')

    def _published_turns(self, record: dict, images: list[Path]) -> tuple[str | None, list[tuple[int, str]]]:
        """The published reading of ``conversations``: a single image without ``<image>`` goes in front of the
        first turn; then, as the template's published preprocessing (``turns_as_given``) reads the turns."""
        conversations = record.get('conversations')
        if not isinstance(conversations, list) or not conversations:
            raise _Bad("no 'conversations' list")
        for i, turn in enumerate(conversations):
            if not isinstance(turn, dict) or not isinstance(turn.get('value'), str) or 'from' not in turn:
                raise _Bad(f"turn {i} must be an object with 'from' and a string 'value'")
        values = [turn['value'] for turn in conversations]
        if (isinstance(record.get('image'), str) and images and IMAGE_PLACEHOLDER not in values[0]):
            values[0] = IMAGE_PLACEHOLDER + '\n' + values[0]
        system = None
        roles = [str(turn['from']).lower() for turn in conversations]
        first = len(roles)  # turn numbers in messages count from the record's first turn
        if roles[0] == 'system':
            if not self.template.turns_as_given:
                raise _Bad(f"a 'system' turn: the published preprocessing of template {self.template.name!r} "
                           "reads human/gpt turns only (a leading system turn is read by internvl2_5; "
                           "record_rules='strict' takes it as the system message)")
            system, roles, values = values[0], roles[1:], values[1:]
        elif not self.template.turns_as_given and ROLES.get(roles[0]) == ASSISTANT:
            roles, values = roles[1:], values[1:]
        first -= len(roles)
        turns = []
        for i, (role, value) in enumerate(zip(roles, values)):
            if role not in ROLES:
                raise _Bad(f'turn {first + i} has role {role!r}; expected human/user, gpt/assistant')
            if not self.template.turns_as_given and ROLES[role] != i % 2:
                raise _Bad(f"turn {first + i} is from {role!r}: turns must alternate, starting with the user")
            turns.append((ROLES[role], value))
        if not turns:
            raise _Bad('no question')
        return system, turns

    def _parse_turns(self, record: dict) -> tuple[str | None, list[tuple[int, str]]]:
        """The strict reading (``record_rules='strict'``)."""
        conversations = record.get('conversations')
        if not isinstance(conversations, list) or not conversations:
            raise _Bad("no 'conversations' list")
        system = None
        turns: list[tuple[int, str]] = []
        for i, turn in enumerate(conversations):
            if not isinstance(turn, dict) or not isinstance(turn.get('value'), str) or 'from' not in turn:
                raise _Bad(f"turn {i} must be an object with 'from' and a string 'value'")
            role = str(turn['from']).lower()
            if role == 'system':
                if i != 0:
                    raise _Bad(f'turn {i}: a system turn may only come first')
                system = turn['value']
                continue
            if role not in ROLES:
                raise _Bad(f"turn {i} has role {turn['from']!r}; expected human/user, gpt/assistant or system")
            for token in RESERVED:
                if token in turn['value']:
                    raise _Bad(f'turn {i} contains the reserved token {token}; images are marked with '
                               f'{IMAGE_PLACEHOLDER}')
            expected = USER if len(turns) % 2 == 0 else ASSISTANT
            if ROLES[role] != expected:
                raise _Bad(f"turn {i} is from {turn['from']!r} but a {('user', 'assistant')[expected]} turn "
                           'was expected: turns must alternate, starting with the user')
            if ROLES[role] == ASSISTANT and IMAGE_PLACEHOLDER in turn['value']:
                raise _Bad(f'turn {i}: {IMAGE_PLACEHOLDER} in an assistant turn')
            turns.append((ROLES[role], turn['value']))
        if not any(role == ASSISTANT for role, _ in turns):
            raise _Bad('no assistant turn')
        if turns[-1][0] != ASSISTANT:
            raise _Bad('the last question has no answer (the record must end with an assistant turn)')
        return system, turns

    def _images(self, source: 'DataSource', record: dict) -> list[Path]:
        value = record.get('image', record.get('images'))
        if value is None or (self.record_rules == 'published' and len(value) == 0):
            return []  # published: "image": "" or [] is a text-only record
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise _Bad("'image' must be a path or a list of paths")
        root = source.image_root
        paths = [Path(n) if os.path.isabs(n) else root / n for n in names]
        for path in paths:
            if not path.is_file():
                raise _Bad(f'image not found: {path}')
        return paths

    def _count_tiles(self, path: Path, max_tiles: int) -> int:
        try:  # the header only: size and format, no pixels
            with Image.open(path) as img:
                size = img.size
        except OSError as err:
            raise _Bad(f'cannot read image {path}: {err}') from None
        return count_tiles(size, self.dynamic, self.tile_size, min(self.min_tiles, max_tiles), max_tiles,
                           self.use_thumbnail)

    # ------------------------------------------------------------------------------------------- encoding
    def _conversation(self, example: Example):
        """The example's dialogue in the template, each ``<image>`` (in order) expanded to its image tokens."""
        conv = self.template.conversation(example.system if example.system is not None else self.system_message)
        tiles = iter(example.tiles)
        remaining = len(example.tiles)
        for role, text in example.turns:
            if self.template.strip_messages:
                text = text.strip()
            while remaining and IMAGE_PLACEHOLDER in text:
                text = text.replace(IMAGE_PLACEHOLDER, image_token_text(self.num_image_token, next(tiles)), 1)
                remaining -= 1
            conv.append(role, text)
        return conv

    def _encode_full(self, example: Example) -> tuple[list[int], list[int]]:
        return encode_conversation(self.tokenizer, self._conversation(example))

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        """Token ids and labels of an example, cut at ``max_length`` (the published truncation)."""
        input_ids, labels = self._encode_full(example)
        return input_ids[:self.max_length], labels[:self.max_length]

    # ------------------------------------------------------------------------------------------- items
    def __len__(self) -> int:
        return len(self.examples)

    def _pixels(self, ex: Example) -> list[torch.Tensor]:
        tiles = []
        for path, expected in zip(ex.images, ex.tiles):
            pixels = load_image(path, self.tile_size, self.dynamic, min(self.min_tiles, ex.max_tiles_per_image),
                                ex.max_tiles_per_image, self.use_thumbnail, augment=ex.augment)
            if pixels.shape[0] != expected:
                raise OSError(f'{path} gave {pixels.shape[0]} tiles, the scan counted {expected} '
                              '(did the file change?)')
            tiles.append(pixels)
        return tiles

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """An example; one whose image cannot be decoded now (truncated, corrupt, changed since the scan) is a
        bad record: reported and, as published, replaced by a record drawn at random -- here from a generator
        seeded by ``seed`` and ``i``, so that a run replays the same replacements in any worker. After
        ``MAX_REPLACEMENTS`` unusable draws (the published limit) the item fails. ``on_bad_record='error'``:
        raised."""
        index = i
        for attempt in range(MAX_REPLACEMENTS + 1):
            ex = self.examples[index]
            try:
                tiles = self._pixels(ex)
            except OSError as err:
                bad = BadRecord(ex.source, ex.index, f'cannot read image: {err}', record_id=None)
                if self.on_bad_record == 'error':
                    raise BadRecordError(bad) from None
                self._add_bad_record_during_training(bad)
                index = random.Random(f'{self.seed}:{i}:{attempt}').randrange(len(self.examples))
                continue
            return self._item(ex, tiles)
        raise RuntimeError(f'SFT item {i}: it and {MAX_REPLACEMENTS} records drawn in its place have unreadable '
                           f'images (last: {bad})')

    def _item(self, ex: Example, tiles: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids, labels = self.encode(ex)
        if tiles:
            pixel_values = torch.cat(tiles)
            image_flags = torch.ones(pixel_values.shape[0], dtype=torch.long)
        else:
            # Text only: one blank tile with flag 0 keeps the backbone in every step's graph (DDP / ZeRO-3).
            pixel_values = torch.zeros(1, 3, self.tile_size, self.tile_size)
            image_flags = torch.zeros(1, dtype=torch.long)
        return {'input_ids': torch.tensor(input_ids, dtype=torch.long),
                'labels': torch.tensor(labels, dtype=torch.long),
                'pixel_values': pixel_values, 'image_flags': image_flags}

    def _add_bad_record_during_training(self, bad: BadRecord) -> None:
        if any((b.source, b.index) == (bad.source, bad.index) for b in self.bad_records):
            return  # met again (drawn as a replacement): reported once
        logger.warning(f'bad record (a random record takes its place): {bad}')
        self.bad_records.append(bad)
        if self.report_file is not None:  # appended: the scan wrote the file; a worker process adds its finds
            with self.report_file.open('a', encoding='utf-8') as f:
                f.write(json.dumps(bad.to_json(), ensure_ascii=False) + '\n')

    # ------------------------------------------------------------------------------------------- report
    def _report(self, files) -> None:
        report_file = self.report_file
        truncated = [ex for ex in self.examples if ex.dropped_rounds]
        scanned = len(self.examples) + len(self.bad_records)
        message = (f'SFT data: {scanned} records in {len(files)} file(s): {len(self.examples)} usable, '
                   f'{len(self.bad_records)} bad (skipped)')
        if truncated:
            message += f', {len(truncated)} truncated to fit max_length {self.max_length} (trailing rounds dropped)'
        cut = [ex for ex in self.examples if ex.truncated_tokens]
        if cut:
            message += f', {len(cut)} cut at max_length {self.max_length} tokens'
        logger.info(message)
        if self.bad_records:
            reasons = Counter(b.reason.split(':')[0] for b in self.bad_records)
            logger.warning('bad records by reason: ' + ', '.join(f'{r} ({n})' for r, n in reasons.most_common()))
            for bad in self.bad_records[:20]:
                logger.warning(f'bad record: {bad}')
            if len(self.bad_records) > 20:
                logger.warning(f'... and {len(self.bad_records) - 20} more bad records'
                          + (f' (all in {report_file})' if report_file else ''))
        if report_file is not None:
            path = Path(report_file)
            atomic_write(path, ''.join(json.dumps(b.to_json(), ensure_ascii=False) + '\n' for b in self.bad_records))
        if not self.examples:
            first = self.bad_records[0] if self.bad_records else '-'
            raise ValueError(f'no usable SFT records in {", ".join(map(str, files))} '
                             f'({len(self.bad_records)} bad; first: {first})')


def _record_id(record: Any) -> str | None:
    if isinstance(record, dict) and record.get('id') is not None:
        return str(record['id'])
    return None


class SFTCollator:
    """Pads a list of ``SFTDataset`` items into a batch (right padding); tiles of all samples are concatenated."""

    def __init__(self, tokenizer=None, pad_id: int | None = None):
        self.pad_id = pad_id if pad_id is not None else pad_token_id(tokenizer)

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(item['input_ids'].numel() for item in items)
        batch = len(items)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for row, item in enumerate(items):
            n = item['input_ids'].numel()
            input_ids[row, :n] = item['input_ids']
            labels[row, :n] = item['labels']
            attention_mask[row, :n] = 1
        return {'input_ids': input_ids, 'labels': labels, 'attention_mask': attention_mask,
                'pixel_values': torch.cat([item['pixel_values'] for item in items]),
                'image_flags': torch.cat([item['image_flags'] for item in items])}
