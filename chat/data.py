"""Supervised fine-tuning data: LLaVA-style JSON/JSONL records -> token ids, masked labels and image tiles.

A record::

    {"id": "0001", "image": "images/0001.jpg",            # or a list of paths, or absent for text only
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                       {"from": "gpt", "value": "A red square."}, ...]}

Roles: ``human``/``user``, ``gpt``/``assistant``, and an optional leading ``system`` turn (replaces the template's
system message). Turns alternate, starting with the user, and end with an answer. Each ``<image>`` stands for one
image, in order; a record with images but no ``<image>`` gets them in front of its first question. Image paths
are relative to ``image_root`` (default: the data file's folder).

Labels: every token is masked (-100) except the assistant answers and the turn-closing text after them (see
``chat.conversation``), so the loss is on what the model should say and on ending its turn.

Maximum length: with ``truncation='turns'`` (default) an over-long record keeps as many whole leading rounds
(question + answer) as fit in ``max_length`` and drops the rest, with the images those rounds referred to; a
record whose first round alone is too long is bad. ``truncation='none'``: every over-long record is bad. A
sequence is never cut inside an image or an answer.

Bad records -- invalid JSON, a wrong structure, no assistant turn, a missing or unreadable image, an
``<image>``/image count mismatch, too long -- are found when the dataset is built (a scan that reads image
headers, not pixels) and reported with the file, the record's index (0-based; JSONL also gives the line) and
the reason. ``on_bad_record='skip'`` leaves them out and logs a summary (and writes ``report_file`` if given);
``'error'`` stops at the first one.
"""
from __future__ import annotations

import json
import logging
import os
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
TRUNCATION = ('turns', 'none')


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
    """A record that passed the scan, cut to the rounds that fit."""

    source: str
    index: int
    system: str | None
    turns: list[tuple[int, str]]
    images: list[Path]
    tiles: list[int]
    max_tiles_per_image: int
    num_tokens: int
    dropped_rounds: int = 0


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


class SFTDataset(torch.utils.data.Dataset):
    """Validated, tokenized SFT records; items are dicts of tensors for ``SFTCollator``.

    Args:
        data_files: .json (a list of records) or .jsonl files.
        tokenizer: a tokenizer holding the image tokens (``chat.tokenization.prepare_tokenizer``).
        num_image_token: LLM tokens per tile (``model.num_image_token``).
        image_root: folder image paths are relative to (default: each data file's folder).
        template: conversation template name; ``system_message`` overrides its system message.
        tile_size, dynamic, min_tiles, max_tiles, use_thumbnail: image preprocessing (``chat.preprocess``);
            with several images in a record each gets ``max(1, max_tiles // n_images)`` tiles at most.
        max_length, truncation: see the module docstring.
        on_bad_record: 'skip' or 'error'. report_file: a JSONL file listing the bad records.
    """

    def __init__(self, data_files: str | os.PathLike | Sequence[str | os.PathLike], tokenizer, *,
                 num_image_token: int, image_root: str | os.PathLike | None = None, template: str = 'Hermes-2',
                 system_message: str | None = None, tile_size: int = 448, dynamic: bool = False,
                 min_tiles: int = 1, max_tiles: int = 12, use_thumbnail: bool = False, max_length: int = 2048,
                 truncation: str = 'turns', on_bad_record: str = 'skip',
                 report_file: str | os.PathLike | None = None):
        if on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f'on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}')
        if truncation not in TRUNCATION:
            raise ValueError(f'truncation must be one of {TRUNCATION}, got {truncation!r}')
        if max_length < 1:
            raise ValueError(f'max_length must be positive, got {max_length}')
        files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
        if not files:
            raise ValueError('no data files given')
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.system_message = system_message
        self.num_image_token = num_image_token
        self.image_root = None if image_root is None else Path(image_root)
        self.tile_size, self.dynamic, self.use_thumbnail = tile_size, dynamic, use_thumbnail
        self.min_tiles, self.max_tiles = min_tiles, max_tiles
        self.max_length, self.truncation, self.on_bad_record = max_length, truncation, on_bad_record
        self._check_tokenizer()

        self.examples: list[Example] = []
        self.bad_records: list[BadRecord] = []
        for file in map(Path, files):
            for index, line, record in iter_records(file):
                try:
                    if isinstance(record, _Bad):
                        raise record
                    self.examples.append(self._scan(file, index, record))
                except _Bad as reason:
                    bad = BadRecord(str(file), index, str(reason), line,
                                    _record_id(record))
                    if on_bad_record == 'error':
                        raise BadRecordError(bad) from None
                    self.bad_records.append(bad)
        self._report(files, report_file)

    @classmethod
    def for_model(cls, model, tokenizer, data_files, **kwargs) -> 'SFTDataset':
        """Preprocessing and template taken from an ``InternVLChatModel``'s settings (kwargs override)."""
        s = model.settings
        defaults = dict(num_image_token=model.num_image_token, template=s.template, tile_size=model.image_size,
                        dynamic=s.dynamic_image_size, min_tiles=s.min_dynamic_patch, max_tiles=s.max_dynamic_patch,
                        use_thumbnail=s.use_thumbnail)
        defaults.update({k: v for k, v in kwargs.items() if v is not None})
        return cls(data_files, tokenizer, **defaults)

    # ------------------------------------------------------------------------------------------- scanning
    def _check_tokenizer(self) -> None:
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in RESERVED + self.template.special_tokens if t not in vocab]
        if missing:
            raise ValueError(f'the tokenizer lacks {", ".join(missing)}; run chat.tokenization.prepare_tokenizer')

    def _scan(self, file: Path, index: int, record: Any) -> Example:
        if not isinstance(record, dict):
            raise _Bad(f'a record must be a JSON object, got {type(record).__name__}')
        system, turns = self._parse_turns(record)
        images = self._images(file, record)
        placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
        if images and placeholders == 0:
            turns[0] = (USER, (IMAGE_PLACEHOLDER + '\n') * len(images) + turns[0][1])
        elif placeholders != len(images):
            raise _Bad(f'{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images')
        per_image = max(1, self.max_tiles // max(1, len(images)))
        tiles = [self._count_tiles(path, per_image) for path in images]

        round_lengths, system_length = self._round_lengths(system, turns, tiles)
        total = system_length + sum(round_lengths)
        kept = len(round_lengths)
        if total > self.max_length:
            if self.truncation == 'none':
                raise _Bad(f'too long: {total} tokens > max_length {self.max_length}')
            while kept and system_length + sum(round_lengths[:kept]) > self.max_length:
                kept -= 1
            if kept == 0:
                raise _Bad(f'too long: {total} tokens, and the first round alone takes '
                           f'{system_length + round_lengths[0]} > max_length {self.max_length}')
        kept_turns = turns[:2 * kept]
        kept_images = sum(text.count(IMAGE_PLACEHOLDER) for _, text in kept_turns)
        return Example(str(file), index, system, kept_turns, images[:kept_images], tiles[:kept_images], per_image,
                       system_length + sum(round_lengths[:kept]), len(round_lengths) - kept)

    def _parse_turns(self, record: dict) -> tuple[str | None, list[tuple[int, str]]]:
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

    def _images(self, file: Path, record: dict) -> list[Path]:
        value = record.get('image', record.get('images'))
        if value is None:
            return []
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise _Bad("'image' must be a path or a list of paths")
        root = self.image_root or file.parent
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
    def _segments(self, system: str | None, turns: Sequence[tuple[int, str]]) -> list[tuple[str, bool]]:
        conv = self.template.conversation(system if system is not None else self.system_message)
        for role, text in turns:
            conv.append(role, text)
        return conv.segments()

    def _tokenize(self, text: str, tiles: Iterator[int]) -> list[int]:
        while IMAGE_PLACEHOLDER in text:
            text = text.replace(IMAGE_PLACEHOLDER, image_token_text(self.num_image_token, next(tiles)), 1)
        return self.tokenizer(text, add_special_tokens=False)['input_ids']

    def _round_lengths(self, system, turns, tiles) -> tuple[list[int], int]:
        """Tokens of the system prompt and of each round (question + answer)."""
        tile_iter = iter(tiles)
        segments = self._segments(system, turns)
        n_system = len(self._segments(system, []))  # pieces before the first question (0 or 1)
        per_round = len(self._segments(system, turns[:2])) - n_system
        lengths = [len(self._tokenize(text, tile_iter)) for text, _ in segments]
        system_length = sum(lengths[:n_system])
        rounds = [sum(lengths[n_system + r * per_round:n_system + (r + 1) * per_round])
                  for r in range(len(turns) // 2)]
        return rounds, system_length

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        """Token ids and labels (answers and their closing text kept, everything else -100)."""
        tile_iter = iter(example.tiles)
        input_ids: list[int] = []
        labels: list[int] = []
        for text, is_target in self._segments(example.system, example.turns):
            ids = self._tokenize(text, tile_iter)
            input_ids += ids
            labels += ids if is_target else [IGNORE_INDEX] * len(ids)
        return input_ids, labels

    # ------------------------------------------------------------------------------------------- items
    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ex = self.examples[i]
        tiles = []
        for path, expected in zip(ex.images, ex.tiles):
            try:
                pixels = load_image(path, self.tile_size, self.dynamic, min(self.min_tiles, ex.max_tiles_per_image),
                                    ex.max_tiles_per_image, self.use_thumbnail)
            except OSError as err:
                raise OSError(f'{ex.source} record {ex.index}: {err}') from None
            if pixels.shape[0] != expected:
                raise RuntimeError(f'{ex.source} record {ex.index}: {path} gave {pixels.shape[0]} tiles, the scan '
                                   f'counted {expected} (did the file change?)')
            tiles.append(pixels)
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

    # ------------------------------------------------------------------------------------------- report
    def _report(self, files, report_file) -> None:
        truncated = [ex for ex in self.examples if ex.dropped_rounds]
        scanned = len(self.examples) + len(self.bad_records)
        message = (f'SFT data: {scanned} records in {len(files)} file(s): {len(self.examples)} usable, '
                   f'{len(self.bad_records)} bad (skipped)')
        if truncated:
            message += f', {len(truncated)} truncated to fit max_length {self.max_length} (trailing rounds dropped)'
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
