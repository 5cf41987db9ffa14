"""Tokenizer set-up for the chat model: the published added tokens and the template's special tokens."""
from __future__ import annotations

from .conversation import get_template
from .model import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN

IMAGE_TOKENS = (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
# The tokens the published fine-tuning script adds to every LLM tokenizer, in its order: a model built from parts
# gets the same ids for them as the published checkpoints.
ADDED_TOKENS = IMAGE_TOKENS + ('<quad>', '</quad>', '<ref>', '</ref>', '<box>', '</box>')


def prepare_tokenizer(tokenizer, template: str = 'Hermes-2', model=None) -> list[str]:
    """Add the published tokens (``ADDED_TOKENS``, in order) and then the template's special tokens where missing.

    With ``model`` (an ``InternVLChatModel``), the LLM's embedding matrix grows to cover the new ids (new rows are
    initialised by transformers from the mean of the old ones) and ``model.img_context_token_id`` is set.
    Returns the tokens added.
    """
    wanted = list(ADDED_TOKENS) + list(get_template(template).special_tokens)
    vocab = tokenizer.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if model is not None:
        bind_tokenizer(model, tokenizer)
    return missing


def bind_tokenizer(model, tokenizer) -> None:
    """Make the model agree with the tokenizer: embedding rows for every id, and the ``<IMG_CONTEXT>`` id."""
    embeddings = model.language_model.get_input_embeddings()
    if len(tokenizer) > embeddings.num_embeddings:
        model.language_model.resize_token_embeddings(len(tokenizer))
    token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f'the tokenizer has no {IMG_CONTEXT_TOKEN} token; call prepare_tokenizer first')
    model.img_context_token_id = token_id


def pad_token_id(tokenizer) -> int:
    """The id used to pad batches (the pad token, else EOS, else 0); padded positions are masked anyway."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
