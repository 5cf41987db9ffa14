"""InternVL-Chat: InternViT -> pixel shuffle -> MLP projector (``mlp1``) -> a Hugging Face causal language model.

The vision part is ``backbones.InternViT`` (the one implementation every package uses). Parameter names are the
published InternVL-Chat layout by construction: ``vision_model.*`` (HF ``InternVisionModel`` names),
``mlp1.{0,1,3}.*`` and ``language_model.*``, so ``state_dict()`` is what a checkpoint directory holds.

An image becomes ``num_image_token`` LLM input vectors per 448px tile: the last layer's patch tokens (or layer
``select_layer``) without cls, a 32x32 grid at 448px, are pixel-shuffled to 16x16 tokens of width 4C and projected
to the LLM width. In the prompt each image is ``<img>`` + ``<IMG_CONTEXT>`` x (num_image_token x tiles) +
``</img>`` (the published layout: one ``<img>...</img>`` per image, holding all of its tiles), and the LLM's
input embeddings at the ``<IMG_CONTEXT>`` positions are replaced by the projected vision tokens, in order.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import torch
from torch import nn

from backbones import InternViT

from .conversation import ASSISTANT, USER, get_template

IMG_START_TOKEN = '<img>'
IMG_END_TOKEN = '</img>'
IMG_CONTEXT_TOKEN = '<IMG_CONTEXT>'
IMAGE_PLACEHOLDER = '<image>'  # what a user writes in a question or a data record where an image goes


def image_token_text(num_image_token: int, num_tiles: int) -> str:
    """The prompt text that stands for one image of ``num_tiles`` tiles."""
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * num_tiles) + IMG_END_TOKEN


def pixel_shuffle(x: torch.Tensor, downsample_ratio: float = 0.5, version: str = 'v2') -> torch.Tensor:
    """Trade spatial resolution for channels: ``[B, h, w, C]`` -> ``[B, h*r, w*r, C/r^2]`` for ``r = 1/k``.

    Order ('v2', the published default since V1-5): with ``k = 1/r``, output token ``(i, j)`` is the
    concatenation over ``(di, dj)`` in row-major order (``di`` outer, ``dj`` inner) of input token
    ``(k*i + di, k*j + dj)``; for ``r = 0.5``::

        out[b, i, j] = cat(x[b, 2i, 2j], x[b, 2i, 2j+1], x[b, 2i+1, 2j], x[b, 2i+1, 2j+1])

    'v1' (V1-1/V1-2 checkpoints, whose config.json has no ``ps_version``) is the same with the output grid
    transposed: ``out_v1[b, j, i] = out_v2[b, i, j]`` (the published code did not swap height and width back;
    the checkpoints were trained that way, so loading them must keep it).
    """
    if version not in ('v1', 'v2'):
        raise ValueError(f"ps_version must be 'v1' or 'v2', got {version!r}")
    b, h, w, c = x.shape
    k = round(1 / downsample_ratio)
    if not math.isclose(k * downsample_ratio, 1.0) or k < 1:
        raise ValueError(f'downsample_ratio must be 1/k for an integer k, got {downsample_ratio}')
    if h % k or w % k:
        raise ValueError(f'pixel shuffle by {downsample_ratio} needs a token grid divisible by {k}, got {h}x{w}')
    out = x.reshape(b, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h // k, w // k, k * k * c)
    return out.transpose(1, 2).contiguous() if version == 'v1' else out


def build_projector(vision_width: int, llm_width: int, downsample_ratio: float = 0.5) -> nn.Sequential:
    """``mlp1``: LayerNorm(4C) -> Linear(4C, H) -> GELU -> Linear(H, H) (indices 0, 1, 3 hold the weights)."""
    in_width = vision_width * round(1 / downsample_ratio) ** 2
    return nn.Sequential(nn.LayerNorm(in_width), nn.Linear(in_width, llm_width), nn.GELU(),
                         nn.Linear(llm_width, llm_width))


@dataclass
class ChatSettings:
    """The chat-specific fields of an InternVL-Chat config.json (names as published)."""

    select_layer: int = -1
    downsample_ratio: float = 0.5
    ps_version: str = 'v2'
    template: str = 'Hermes-2'
    force_image_size: int | None = None  # the tile size; None: the vision model's image size
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6  # the published InternVLChatConfig default

    def __post_init__(self):
        get_template(self.template)  # fail early on an unknown template
        if self.ps_version not in ('v1', 'v2'):
            raise ValueError(f"ps_version must be 'v1' or 'v2', got {self.ps_version!r}")
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise ValueError(f'need 1 <= min_dynamic_patch <= max_dynamic_patch, got {self.min_dynamic_patch}, '
                             f'{self.max_dynamic_patch}')

    @classmethod
    def from_config(cls, config: dict) -> 'ChatSettings':
        known = {f.name for f in fields(cls)}
        values = {k: config[k] for k in known if k in config and config[k] is not None}
        # Checkpoints written before ps_version existed (V1-1, V1-2) use the 'v1' order.
        values.setdefault('ps_version', 'v1')
        return cls(**values)

    def to_config(self) -> dict:
        return asdict(self)


class InternVLChatModel(nn.Module):
    """The chat model. Build it with ``chat.checkpoint.load_chat_model`` or ``build_from_parts``.

    Args:
        vision_model: an ``InternViT`` (built non-frozen; use ``set_trainable`` to freeze parts).
        language_model: a transformers causal LM (``AutoModelForCausalLM``).
        settings: the chat fields of config.json (select layer, pixel-shuffle ratio and order, template, tiles).
        img_context_token_id: the tokenizer id of ``<IMG_CONTEXT>`` (see ``chat.tokenization.prepare_tokenizer``).
    """

    def __init__(self, vision_model: InternViT, language_model: nn.Module, settings: ChatSettings | None = None,
                 img_context_token_id: int | None = None):
        super().__init__()
        self.settings = settings or ChatSettings()
        self.vision_model = vision_model
        llm_width = language_model.config.hidden_size
        self.mlp1 = build_projector(vision_model.embed_dim, llm_width, self.settings.downsample_ratio)
        self.language_model = language_model
        self.img_context_token_id = img_context_token_id
        depth = vision_model.depth
        if not -depth - 1 <= self.settings.select_layer <= depth:
            raise ValueError(f'select_layer {self.settings.select_layer} is out of range for a {depth}-layer '
                             f'vision model (hidden_states has {depth + 1} entries: -{depth + 1}..{depth})')
        grid = self.image_size // vision_model.arch.patch_size
        if self.image_size % vision_model.arch.patch_size or (grid * self.settings.downsample_ratio) % 1:
            raise ValueError(f'image size {self.image_size} does not give a token grid divisible by '
                             f'{round(1 / self.settings.downsample_ratio)} (patch {vision_model.arch.patch_size})')

    # ------------------------------------------------------------------------------------------- properties
    @property
    def image_size(self) -> int:
        return int(self.settings.force_image_size or self.vision_model.arch.img_size)

    @property
    def num_image_token(self) -> int:
        """LLM tokens per tile: ``(image_size / patch)^2 * downsample_ratio^2`` (256 at 448px)."""
        grid = self.image_size // self.vision_model.arch.patch_size
        return int(round(grid * self.settings.downsample_ratio)) ** 2

    @property
    def template(self):
        return get_template(self.settings.template)

    def image_tokens(self, num_tiles: int) -> str:
        """The prompt text that stands for one image of ``num_tiles`` tiles."""
        return image_token_text(self.num_image_token, num_tiles)

    # ------------------------------------------------------------------------------------------- training set-up
    def set_trainable(self, *, backbone: bool = True, llm: bool = True, projector: bool = True,
                      unfreeze_vit_layers: int = 0, unfreeze_backbone_last: int = 0) -> dict[str, int]:
        """Freeze or unfreeze the three parts. ``unfreeze_vit_layers=N`` then trains ``layers[N:]`` as the
        published ``--unfreeze_vit_layers`` (negative N: the last -N layers; 0: none);
        ``unfreeze_backbone_last=N`` trains the last N layers. Returns the number of trainable parameters per part.
        """
        depth = self.vision_model.depth
        if not -depth <= unfreeze_vit_layers < depth:
            raise ValueError(f'unfreeze_vit_layers must be in [-{depth}, {depth - 1}] for a {depth}-layer backbone '
                             f'(layers[N:] are trained), got {unfreeze_vit_layers}')
        if not 0 <= unfreeze_backbone_last <= depth:
            raise ValueError(f'unfreeze_backbone_last must be between 0 and the backbone depth {depth}, '
                             f'got {unfreeze_backbone_last}')
        self.vision_model.requires_grad_(backbone)
        if unfreeze_vit_layers:
            self.vision_model.encoder.layers[unfreeze_vit_layers:].requires_grad_(True)
        if unfreeze_backbone_last:
            self.vision_model.encoder.layers[-unfreeze_backbone_last:].requires_grad_(True)
        self.language_model.requires_grad_(llm)
        self.mlp1.requires_grad_(projector)
        return self.trainable_parameters()

    def set_drop_path_rate(self, rate: float) -> None:
        """Stochastic depth on the backbone, rising linearly from 0 at the first block to ``rate`` at the last (the
        published ``--drop_path_rate``; V1-2 fine-tuning used 0.4)."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f'drop_path_rate must be in [0, 1), got {rate}')
        layers = self.vision_model.encoder.layers
        for block, prob in zip(layers, torch.linspace(0, rate, len(layers)).tolist()):
            block.drop_path.prob = prob
        self.vision_model.drop_path_rate = rate

    def trainable_parameters(self) -> dict[str, int]:
        parts = {'vision_model': self.vision_model, 'mlp1': self.mlp1, 'language_model': self.language_model}
        return {name: sum(p.numel() for p in part.parameters() if p.requires_grad) for name, part in parts.items()}

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False):
        """Recompute activations in backward: every backbone block, and the LLM layers as transformers does it
        (HF Trainer's ``--activation_checkpointing`` calls this)."""
        self.vision_model.grad_checkpointing = True
        kwargs = {'use_reentrant': False, **(activation_checkpointing_kwargs or {})}
        self.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                                            every_n_layers=every_n_layers, offload=offload)

    def activation_checkpointing_disable(self):
        self.vision_model.grad_checkpointing = False
        self.language_model.activation_checkpointing_disable()

    gradient_checkpointing_enable = activation_checkpointing_enable  # the older transformers name

    # ------------------------------------------------------------------------------------------- forward
    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[T, 3, S, S]`` tiles -> ``[T, num_image_token, llm_width]`` projected vision tokens."""
        vision = self.vision_model
        vision_dtype = vision.embeddings.patch_embedding.weight.dtype
        x = pixel_values.to(vision_dtype)
        trains_vision = torch.is_grad_enabled() and any(p.requires_grad for p in vision.parameters())
        # select_layer indexes the published hidden_states: entry 0 is the embedding output, entry k the output
        # of k blocks, -1 the last block's output.
        depth = vision.depth
        blocks = self.settings.select_layer % (depth + 1)
        with contextlib.nullcontext() if trains_vision else torch.no_grad():
            if blocks == depth:
                tokens = vision.forward_features(x)
            elif blocks == 0:
                tokens = vision.embeddings(x)
            else:
                tokens = vision.forward_intermediates(x, [blocks - 1], output_format='tokens', with_cls=True)[0]
        patches = tokens[:, 1:]
        t, n, c = patches.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f'the vision model gave {n} patch tokens, not a square grid; tiles must be square')
        grid = pixel_shuffle(patches.reshape(t, side, side, c), self.settings.downsample_ratio,
                             self.settings.ps_version)
        flat = grid.reshape(t, -1, grid.shape[-1])
        return self.mlp1(flat.to(self.mlp1[0].weight.dtype))

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                     image_flags: torch.Tensor | None = None) -> torch.Tensor:
        """LLM input embeddings with the ``<IMG_CONTEXT>`` positions replaced by the tiles' vision tokens.

        Tiles are matched to context tokens in order (row-major over the batch). ``image_flags`` marks
        placeholder tiles (0) that text-only samples carry so that every step runs the backbone (DDP and
        ZeRO-3 need the same parameters used on every rank); they join the graph with weight zero.
        """
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is None:
            if self.img_context_token_id is not None and (input_ids == self.img_context_token_id).any():
                raise ValueError('the input has <IMG_CONTEXT> tokens but no pixel_values were given')
            return embeds
        if self.img_context_token_id is None:
            raise ValueError('img_context_token_id is not set: call chat.tokenization.prepare_tokenizer(model, '
                             'tokenizer) (or load the tokenizer with chat.checkpoint.load_tokenizer) first')
        vit = self.extract_feature(pixel_values)
        if image_flags is None:
            real = vit
            unused = None
        else:
            flags = image_flags.reshape(-1).bool()
            if flags.numel() != vit.shape[0]:
                raise ValueError(f'image_flags has {flags.numel()} entries for {vit.shape[0]} tiles')
            real, unused = vit[flags], vit[~flags]
        mask = input_ids == self.img_context_token_id
        n_context, n_vision = int(mask.sum()), real.shape[0] * real.shape[1]
        if n_context != n_vision:
            raise ValueError(f'the input has {n_context} <IMG_CONTEXT> tokens but the images give {n_vision} '
                             f'vision tokens ({real.shape[0]} tiles x {self.num_image_token}); every tile needs '
                             f'{self.num_image_token} context tokens and none may be cut off by truncation')
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), real.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
        if unused is not None and unused.numel():
            embeds = embeds + 0.0 * unused.sum().to(embeds.dtype)
        return embeds

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                image_flags: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, **kwargs):
        """Language-model outputs (``loss`` when ``labels`` are given: next-token cross-entropy, -100 ignored).

        Extra keyword arguments (e.g. the Trainer's ``num_items_in_batch``) go to the language model.
        """
        embeds = self.embed_inputs(input_ids, pixel_values, image_flags)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                   labels=labels, **kwargs)

    # ------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """The language model's ``generate`` on the image-filled embeddings; returns only the new tokens."""
        embeds = self.embed_inputs(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    def stop_token_ids(self, tokenizer) -> list[int]:
        """The id that ends an answer, as published: the template's separator token (``sep.strip()``; 'plain':
        the newline, which a byte-level tokenizer spells as one token of another name)."""
        stop = self.template.stop_str
        token_id = tokenizer.convert_tokens_to_ids(stop)
        if token_id is None or token_id == tokenizer.unk_token_id:
            encoded = tokenizer.encode(stop, add_special_tokens=False)
            token_id = encoded[0] if len(encoded) == 1 else None
        if token_id is None:
            raise ValueError(f"the tokenizer has no single token for {stop!r}, the {self.template.name} template's "
                             'separator at which generation stops; prepare it with '
                             'chat.tokenization.prepare_tokenizer')
        return [token_id]

    def build_prompt(self, question: str, history: Sequence[tuple[str, str]] = (), num_images: int = 0,
                     num_patches_list: Sequence[int] | None = None, system_message: str | None = None) -> str:
        """The prompt text for ``question`` after ``history``, the first ``len(num_patches_list)`` ``<image>``
        placeholders expanded to image tokens (as published: later ones stay text)."""
        conv = self.template.conversation(system_message)
        for old_question, old_answer in history:
            conv.append(USER, old_question).append(ASSISTANT, old_answer)
        conv.append(USER, question).append(ASSISTANT, None)
        prompt = conv.prompt()
        patches = list(num_patches_list or [])
        placeholders = prompt.count(IMAGE_PLACEHOLDER)
        if placeholders < len(patches):
            raise ValueError(f'the conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholders but '
                             f'{len(patches)} images were given')
        for tiles in patches:
            prompt = prompt.replace(IMAGE_PLACEHOLDER, self.image_tokens(tiles), 1)
        return prompt

    def chat(self, tokenizer, pixel_values: torch.Tensor | None, question: str,
             generation_config: dict | Any | None = None, history: list[tuple[str, str]] | None = None,
             return_history: bool = False, num_patches_list: Sequence[int] | None = None,
             system_message: str | None = None):
        """Answer ``question`` about the image(s), as the published ``chat()``: returns the answer, or
        ``(answer, history)`` with ``return_history=True``.

        ``pixel_values`` holds the tiles of every image in the conversation (``[T, 3, S, S]``), or None for
        text only; ``num_patches_list`` gives the tile count per image (default: one image with all T tiles).
        With ``history=None`` and images, a question without ``<image>`` gets one ``<image>\\n`` in front. The
        prompt is encoded with the tokenizer's default special tokens (a LLaMA tokenizer's ``<s>``), generation
        stops at the template's separator token, and the decoded answer is cut there and stripped. The prompt is
        re-encoded with the whole history each turn, so pass the same ``pixel_values`` again on later turns.
        ``generation_config``: a dict of ``generate`` arguments or a ``GenerationConfig`` (default: greedy,
        64 new tokens).
        """
        if pixel_values is not None and pixel_values.ndim != 4:
            raise ValueError(f'pixel_values must be [tiles, 3, H, W], got shape {tuple(pixel_values.shape)}')
        if history is None and pixel_values is not None and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + '\n' + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        if pixel_values is not None and sum(num_patches_list) != pixel_values.shape[0]:
            raise ValueError(f'num_patches_list {list(num_patches_list)} adds up to {sum(num_patches_list)} '
                             f'tiles but pixel_values has {pixel_values.shape[0]}')
        history = [] if history is None else list(history)
        self._check_tokenizer(tokenizer)
        prompt = self.build_prompt(question, history, num_patches_list=num_patches_list,
                                   system_message=system_message)
        encoded = tokenizer(prompt, return_tensors='pt')
        device = self.language_model.get_input_embeddings().weight.device
        gen_kwargs = self._generation_kwargs(tokenizer, generation_config)
        output = self.generate(encoded['input_ids'].to(device),
                               None if pixel_values is None else pixel_values.to(device),
                               attention_mask=encoded['attention_mask'].to(device), **gen_kwargs)
        text = tokenizer.decode(output[0], skip_special_tokens=True)
        answer = self.template.conversation().clean_answer(text)
        history.append((question, answer))
        return (answer, history) if return_history else answer

    def _check_tokenizer(self, tokenizer) -> None:
        token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f'the tokenizer has no {IMG_CONTEXT_TOKEN} token; prepare it with '
                             'chat.tokenization.prepare_tokenizer')
        if self.img_context_token_id is None:
            self.img_context_token_id = token_id
        elif token_id != self.img_context_token_id:
            raise ValueError(f'the tokenizer maps {IMG_CONTEXT_TOKEN} to {token_id} but the model expects '
                             f'{self.img_context_token_id}: wrong tokenizer for this model')

    def _generation_kwargs(self, tokenizer, generation_config) -> dict:
        from transformers import GenerationConfig
        if generation_config is None:
            kwargs = {'max_new_tokens': 64, 'do_sample': False}
        elif isinstance(generation_config, GenerationConfig):
            kwargs = {'generation_config': generation_config}
        else:
            kwargs = dict(generation_config)
        stop_ids = self.stop_token_ids(tokenizer)
        kwargs['eos_token_id'] = stop_ids[0] if len(stop_ids) == 1 else stop_ids  # as published: the template's
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        kwargs.setdefault('pad_token_id', pad)
        return kwargs
