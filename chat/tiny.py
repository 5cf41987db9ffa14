"""Tiny, randomly initialised parts for tests and the CPU quick start: a byte-level BPE tokenizer trained in a
fraction of a second, a 2-layer Llama, the ``internvit_tiny`` backbone, and a synthetic SFT set of coloured
squares. Nothing here is downloaded; nothing here is a real model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

COLOURS = {'red': (220, 30, 30), 'green': (30, 180, 60), 'blue': (40, 60, 220), 'yellow': (230, 210, 40)}
_CORPUS = [
    'what colour is the square?', 'the square is red.', 'the square is green.', 'the square is blue.',
    'the square is yellow.', 'describe the image.', 'a square on a grey background.', 'system', 'user',
    'assistant', 'hello, how are you?', 'i am fine, thank you.', 'which shape is shown?', 'a square.',
]


def build_tiny_tokenizer(extra_text: list[str] | None = None, vocab_size: int = 420):
    """A byte-level BPE tokenizer (any text encodes; it round-trips exactly) with EOS and PAD tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>', '<pad>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4 + list(extra_text or []), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|endoftext|>', pad_token='<pad>')


def tiny_llm_config(vocab_size: int, hidden_size: int = 32, num_layers: int = 2):
    """A 2-layer Llama (the V1-2 LLM family) small enough to train in seconds on a CPU."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=None,
                       eos_token_id=0, pad_token_id=1)


def build_tiny_parts(seed: int = 0, image_size: int = 56):
    """``(backbone, llm, tokenizer)``: ``internvit_tiny`` at ``image_size``, a tiny Llama and its tokenizer."""
    from transformers import AutoModelForCausalLM

    from backbones import InternViT
    with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's random state
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer()
        llm = AutoModelForCausalLM.from_config(tiny_llm_config(len(tokenizer)), attn_implementation='sdpa')
        backbone = InternViT('internvit_tiny', img_size=image_size)
    return backbone, llm, tokenizer


def write_tiny_llm(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """An LLM directory (config, weights, tokenizer) as transformers writes it, for ``build_from_parts``."""
    _, llm, tokenizer = build_tiny_parts(seed)
    out = Path(out_dir)
    llm.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def colour_square(colour: str, size: int = 64, background=(128, 128, 128)):
    from PIL import Image, ImageDraw
    img = Image.new('RGB', (size, size), background)
    ImageDraw.Draw(img).rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=COLOURS[colour])
    return img


def write_colour_dataset(out_dir: str | os.PathLike, copies: int = 2, image_size: int = 64) -> Path:
    """``out_dir/train.jsonl`` + ``out_dir/images/*.png``: 'what colour is the square?' -> 'the square is X.'"""
    out = Path(out_dir)
    (out / 'images').mkdir(parents=True, exist_ok=True)
    lines = []
    for colour in COLOURS:
        colour_square(colour, image_size).save(out / 'images' / f'{colour}.png')
        for k in range(copies):
            lines.append({'id': f'{colour}-{k}', 'image': f'images/{colour}.png',
                          'conversations': [{'from': 'human', 'value': '<image>\nwhat colour is the square?'},
                                            {'from': 'gpt', 'value': f'the square is {colour}.'}]})
    data = out / 'train.jsonl'
    data.write_text(''.join(json.dumps(line) + '\n' for line in lines))
    return data


def build_tiny_sp_tokenizer(add_bos: bool = False, vocab_size: int = 160):
    """A SentencePiece-style tokenizer (BPE over ``▁``-marked words, the word-start piece prepended to every
    text, like LLaMA's and Yi's): ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<|im_start|>`` 3, ``<|im_end|>`` 4.
    ``add_bos``: every encoding starts with ``<s>``, as LLaMA tokenizers do by default."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ['<unk>', '<s>', '</s>', '<|im_start|>', '<|im_end|>']
    tok = Tokenizer(models.BPE(unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='always')
    tok.decoder = decoders.Metaspace(replacement='▁', prepend_scheme='always')
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=list('\nabcdefghijklmnopqrstuvwxyz?.,:!<>/'))
    tok.train_from_iterator(_CORPUS * 4 + ['user\nwhat', 'assistant\nthe', '<human>: hi <bot>: hello'], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A <s> $B',
                                                           special_tokens=[('<s>', 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='<unk>', bos_token='<s>', eos_token='</s>',
                                   pad_token='</s>')


PHI3_TOKENS = ('<|endoftext|>', '<|assistant|>', '<|system|>', '<|end|>', '<|user|>')


def build_tiny_llama_tokenizer(legacy: bool = True, phi3: bool = False, vocab_size: int = 160):
    """A tokenizer that behaves like the LLaMA SentencePiece tokenizers: transformers' own ``LlamaTokenizer``
    (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, the 256 byte-fallback pieces, then a tiny BPE vocabulary), ``<s>`` added
    in front, ``▁`` prepended to the text and, with ``legacy`` (LLaMA-2 / V1-1), again after every special token.

    ``phi3``: as Phi-3-mini's tokenizer (Mini-InternVL-Chat-4B-V1-5): ``legacy=False``, ``<s>`` added (the
    published ``preprocess_phi3`` counts one leading BOS) and the added tokens ``<|endoftext|>`` (EOS and pad),
    ``<|assistant|>``, ``<|system|>``, ``<|end|>``, ``<|user|>``, each swallowing the whitespace after it
    (``rstrip``, as Phi-3's tokenizer config declares them).
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer
    specials = ['<unk>', '<s>', '</s>']
    tok = Tokenizer(models.BPE(unk_token='<unk>'))
    # trained on words, so that no piece spans a word boundary (SentencePiece's split_by_whitespace)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='always', split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=list('\nabcdefghijklmnopqrstuvwxyz?.,:!<>/|'))
    tok.train_from_iterator(_CORPUS * 4 + ['<human>: hi <bot>: hello', 'user\nwhat', 'assistant\nthe'], trainer)
    model = json.loads(tok.to_str())['model']
    pieces = sorted(model['vocab'], key=model['vocab'].get)
    vocab = {p: i for i, p in enumerate(specials + [f'<0x{b:02X}>' for b in range(256)] + pieces[len(specials):])}
    merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in model['merges']]
    if not phi3:
        # pad: <unk>, never </s> (the published V1-1 preprocess counts every non-pad token)
        return LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy, add_bos_token=True, pad_token='<unk>')
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_bos_token=True)
    tokenizer.add_tokens([AddedToken(t, rstrip=True, special=True, normalized=False) for t in PHI3_TOKENS],
                         special_tokens=True)
    tokenizer.eos_token = tokenizer.pad_token = '<|endoftext|>'
    return tokenizer
