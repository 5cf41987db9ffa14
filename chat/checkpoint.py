"""Load and save InternVL-Chat checkpoints in the published directory layout, or build one from parts.

A chat checkpoint directory holds::

    config.json                      architectures ["InternVLChatModel"], model_type "internvl_chat",
                                     vision_config (InternVisionConfig fields), llm_config (the LLM's HF config),
                                     select_layer, downsample_ratio, ps_version, template, force_image_size,
                                     dynamic_image_size, use_thumbnail, min/max_dynamic_patch, torch_dtype
    model-0000k-of-0000n.safetensors tensors vision_model.*, mlp1.{0,1,3}.*, language_model.*
    model.safetensors.index.json     (or a single model.safetensors below the shard size)
    tokenizer files                  when a tokenizer is saved with the model

The vision tensors are read by ``backbones.reading.read_weights`` (the one reader of InternViT layouts), the
LLM tensors by transformers' ``from_pretrained`` (``language_model.`` prefix mapped away), the projector by this
module. Every file from outside is read as safetensors or with ``torch.load(weights_only=True)``. Saving writes a
temporary directory next to the target and renames it at the end, and refuses an existing target unless
``overwrite=True``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from backbones import InternViT
from backbones.arch_config import arch_for_weights, hf_config_from_arch
from backbones.atomic import atomic_dir, json_dump
from backbones.dtypes import as_dtype as _dtype
from backbones.hub import local_path
from backbones.loading import build_and_load
from backbones.reading import read_tensors, read_weights, safe_torch_load
from backbones.reading import weight_files as weight_map
from backbones.writing import save_safetensors_shards

from .model import ChatSettings, InternVLChatModel
from .tokenization import IMAGE_TOKENS, bind_tokenizer, prepare_tokenizer

logger = logging.getLogger(__name__)

VISION_PREFIX, PROJECTOR_PREFIX, LLM_PREFIX = 'vision_model.', 'mlp1.', 'language_model.'
DEFAULT_SHARD_BYTES = 5 * 2 ** 30


class ChatCheckpointError(ValueError):
    """A chat checkpoint that cannot be read or does not fit; the message names the file or tensor."""


# ----------------------------------------------------------------------------------------------- reading
def read_chat_config(path: str | os.PathLike) -> dict:
    """config.json of a chat checkpoint directory; it must have ``vision_config`` and ``llm_config``."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f'chat checkpoint directory {path} does not exist')
    file = root / 'config.json'
    if not file.is_file():
        raise ChatCheckpointError(f'{root} has no config.json: not an InternVL-Chat checkpoint directory')
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ChatCheckpointError(f'cannot read {file}: {err}') from None
    for key in ('vision_config', 'llm_config'):
        if not isinstance(config.get(key), dict):
            raise ChatCheckpointError(f'{file} has no {key!r} object: not an InternVL-Chat config '
                                      f'(found keys: {", ".join(sorted(config)[:12])})')
    return config


def _strip(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items()}


def _remote_class(auto_map: dict, auto_class: str, code_dir, trust_remote_code: bool, source: str):
    """The class ``auto_map[auto_class]`` from the Python files shipped in ``code_dir`` (the published V1-5
    directories ship ``configuration_internlm2.py`` / ``modeling_internlm2.py``); running them needs consent."""
    reference = auto_map.get(auto_class) if isinstance(auto_map, dict) else None
    if isinstance(reference, (list, tuple)):
        reference = reference[0]
    if not reference:
        return None
    module_file = reference.split('.')[0] + '.py'
    if not trust_remote_code:
        raise ChatCheckpointError(
            f'{source}: the language model needs the remote code {module_file} shipped with the checkpoint '
            f'({auto_class} -> {reference}); it runs Python code from that directory, so it is only loaded when '
            'you pass trust_remote_code=True (tools: --trust_remote_code True)')
    if code_dir is None or not (Path(code_dir) / module_file).is_file():
        raise ChatCheckpointError(f'{source}: {auto_class} -> {reference} needs {module_file}, which is not in '
                                  f'{code_dir}')
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    return get_class_from_dynamic_module(reference, str(code_dir))


def build_llm_config(llm_config, source: str = 'llm_config', *, code_dir=None, trust_remote_code: bool = False):
    """A transformers config object from an ``llm_config`` dict (or the object itself). A model type that the
    installed transformers lacks is built from the remote code in ``code_dir`` (``auto_map``), with consent."""
    from transformers import AutoConfig, PretrainedConfig
    if isinstance(llm_config, PretrainedConfig):
        return llm_config
    fields = {k: v for k, v in llm_config.items() if k not in ('attn_implementation', '_attn_implementation')}
    model_type = fields.pop('model_type', None)
    if model_type is None:
        raise ChatCheckpointError(f'{source} has no model_type')
    try:
        return AutoConfig.for_model(model_type, **fields)
    except ValueError as err:
        remote = _remote_class(fields.get('auto_map'), 'AutoConfig', code_dir, trust_remote_code, source)
        if remote is None:
            raise ChatCheckpointError(
                f'{source}: model_type {model_type!r} is not an architecture of the installed transformers and '
                f'the config has no auto_map to remote code: {str(err)[:200]}') from None
        return remote(**fields)


def build_language_model(llm_config, checkpoint_dir: str | os.PathLike | None = None, *,
                         prefix: str = LLM_PREFIX, dtype: torch.dtype | None = None,
                         attn_implementation: str = 'sdpa', source: str = 'llm_config',
                         trust_remote_code: bool = False, code_dir: str | os.PathLike | None = None) -> nn.Module:
    """A transformers causal LM from a config (dict or ``PretrainedConfig``): random, or loaded from the
    ``prefix``-ed tensors of an HF-style checkpoint directory (a chat checkpoint holds them as
    ``language_model.*``).

    Loading goes through transformers' own ``from_pretrained`` (shards read one at a time, no random init of
    loaded weights, ZeRO-3 partitioning when DeepSpeed is set up); missing or mis-shaped tensors are errors
    that name them. A model whose code ships in the checkpoint directory (``auto_map``) needs
    ``trust_remote_code=True``.
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.utils import logging as hf_logging
    code_dir = code_dir if code_dir is not None else checkpoint_dir
    config = build_llm_config(llm_config, source, code_dir=code_dir, trust_remote_code=trust_remote_code)
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    else:
        cls = _remote_class(getattr(config, 'auto_map', None), 'AutoModelForCausalLM', code_dir, trust_remote_code,
                            source)
        if cls is None:
            raise ChatCheckpointError(f'{source}: {type(config).__name__} has no causal-LM class in transformers '
                                      'and no auto_map entry AutoModelForCausalLM')
    if checkpoint_dir is None:
        if cls is MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config)):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        return cls._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would list every vision/projector tensor as unexpected
    try:
        model, info = cls.from_pretrained(str(checkpoint_dir), config=config, dtype=dtype,
                                          key_mapping={'^' + re.escape(prefix): ''} if prefix else None,
                                          attn_implementation=attn_implementation, output_loading_info=True,
                                          ignore_mismatched_sizes=True)  # reported below, by name
    finally:
        hf_logging.set_verbosity(verbosity)
    others = (VISION_PREFIX, PROJECTOR_PREFIX) if prefix else ()
    found = {'missing': sorted(map(str, info.get('missing_keys') or ())),
             'unexpected': sorted(k for k in map(str, info.get('unexpected_keys') or ()) if not k.startswith(others)),
             'mis-shaped': sorted(map(str, info.get('mismatched_keys') or ()))}
    problems = [f'{kind} {len(names)}: {", ".join(names[:5])}' + (' ...' if len(names) > 5 else '')
                for kind, names in found.items() if names]
    if problems:
        raise ChatCheckpointError(f'{source}: the language-model tensors do not fit {cls.__name__} '
                                  f'({"; ".join(problems)})')
    return model


def _build_vision(weights, source: str, dtype: torch.dtype | None) -> InternViT:
    """An InternViT shaped by the checkpoint, built without a random init, each tensor placed once in ``dtype``."""
    arch = arch_for_weights(weights)
    return build_and_load(lambda: InternViT(arch), weights.state_dict, source=source, dtype=dtype)


def load_chat_model(path: str | os.PathLike, *, dtype=None, attn_implementation: str = 'sdpa',
                    strict: bool = True, trust_remote_code: bool = False) -> InternVLChatModel:
    """An ``InternVLChatModel`` from a chat checkpoint directory (published layout), in eval mode.

    ``dtype``: cast everything to it; None keeps config.json's ``torch_dtype`` (else float32). Tensors outside
    ``vision_model.``/``mlp1.``/``language_model.`` are an error (``strict=False``: logged and ignored).
    """
    root = local_path(path, what='chat checkpoint directory')  # a hub id: its cached snapshot
    config = read_chat_config(root)
    settings = ChatSettings.from_config(config)
    dtype = _dtype(dtype) or _dtype(config.get('torch_dtype')) or torch.float32
    files = weight_map(root)
    groups = {p: [k for k in files if k.startswith(p)] for p in (VISION_PREFIX, PROJECTOR_PREFIX, LLM_PREFIX)}
    other = [k for k in files if not any(k.startswith(p) for p in groups)]
    if other:
        message = f'{root}: {len(other)} tensors outside vision_model./mlp1./language_model.: {", ".join(other[:5])}'
        if strict:
            raise ChatCheckpointError(message + ' (pass strict=False to ignore them)')
        logger.warning(message + ' (ignored)')
    for prefix, keys in groups.items():
        if not keys:
            raise ChatCheckpointError(f'{root} has no {prefix}* tensors: not a complete InternVL-Chat checkpoint')

    vision = _build_vision(read_weights(root), str(root), dtype)
    llm = build_language_model(config['llm_config'], root, dtype=dtype, attn_implementation=attn_implementation,
                               source=f'{root} (llm_config)', trust_remote_code=trust_remote_code)
    model = InternVLChatModel(vision, llm, settings, img_context_token_id=config.get('img_context_token_id'))
    load_projector(model, _strip(read_tensors(files, groups[PROJECTOR_PREFIX]), PROJECTOR_PREFIX), source=str(root))
    model.to(dtype)
    model.eval()
    logger.info(f'loaded InternVL-Chat from {root}: vision {vision.depth} layers x {vision.embed_dim}, '
              f'LLM {type(llm).__name__}, {model.num_image_token} tokens per {model.image_size}px tile, '
              f'template {settings.template}, {dtype}')
    return model


def load_projector(model: InternVLChatModel, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``mlp1`` tensors (names without the ``mlp1.`` prefix) into the model; shapes are checked."""
    expected = model.mlp1.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f'mlp1.{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise ChatCheckpointError(
            f'{source}: the projector does not fit (LayerNorm(4C) -> Linear(4C, H) -> GELU -> Linear(H, H) with '
            f'C={model.vision_model.embed_dim}, H={model.language_model.config.hidden_size}): '
            + '; '.join(filter(None, [missing and f'missing mlp1.{", mlp1.".join(missing)}',
                                      unexpected and f'unexpected mlp1.{", mlp1.".join(unexpected)}',
                                      '; '.join(mismatched)])))
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state_dict[k])


def read_projector(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``mlp1`` tensors (names without the prefix) from the published pre-trained projector file
    (``mlp_projector/*.pth``: a bare ``mlp1`` state dict, read with ``weights_only=True``; ``.safetensors`` too;
    ``mlp1.``-prefixed names accepted) or from a chat checkpoint directory."""
    root = Path(path)
    if root.is_dir():
        files = weight_map(root)
        keys = [k for k in files if k.startswith(PROJECTOR_PREFIX)]
        if not keys:
            raise ChatCheckpointError(f'{root} has no {PROJECTOR_PREFIX}* tensors to take the projector from')
        return _strip(read_tensors(files, keys), PROJECTOR_PREFIX)
    if not root.is_file():
        raise FileNotFoundError(f'projector file {root} does not exist')
    if root.suffix == '.safetensors':
        from safetensors.torch import load_file
        tensors = load_file(str(root))
    else:
        tensors = safe_torch_load(root)
    if not isinstance(tensors, Mapping) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ChatCheckpointError(f'{root} is not a projector state dict (a mapping of mlp1 tensor names to tensors)')
    return {(k[len(PROJECTOR_PREFIX):] if k.startswith(PROJECTOR_PREFIX) else k): v for k, v in tensors.items()}


def load_tokenizer(path: str | os.PathLike, model: InternVLChatModel | None = None, *,
                   trust_remote_code: bool = False):
    """The tokenizer saved with a chat checkpoint (or an LLM directory); with ``model``, bound to it.
    ``trust_remote_code``: allow a tokenizer class shipped as Python code in the directory (InternLM2's)."""
    from transformers import AutoTokenizer
    path = local_path(path, what='tokenizer directory')  # a hub id: its cached snapshot
    # The LLM's config tells transformers which tokenizer family this is; the chat config.json would not.
    if model is not None:
        llm_config = model.language_model.config
    else:
        try:
            llm_config = build_llm_config(read_chat_config(path)['llm_config'], str(path), code_dir=path,
                                          trust_remote_code=trust_remote_code)
        except (ChatCheckpointError, FileNotFoundError):
            llm_config = None  # an LLM directory: its own config.json serves
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                              **({'config': llm_config} if llm_config else {}))
    missing = [t for t in IMAGE_TOKENS if t not in tokenizer.get_vocab()]
    if missing and model is not None:
        raise ChatCheckpointError(f'the tokenizer in {path} lacks {", ".join(missing)}: it is not the tokenizer '
                                  'of a chat checkpoint (use prepare_tokenizer for a fresh LLM tokenizer)')
    if model is not None:
        bind_tokenizer(model, tokenizer)
    return tokenizer


def build_from_parts(backbone: str | os.PathLike | InternViT, llm: str | os.PathLike | nn.Module, tokenizer=None,
                     *, settings: ChatSettings | None = None, projector: str | os.PathLike | None = None,
                     dtype=None, attn_implementation: str = 'sdpa',
                     trust_remote_code: bool = False) -> tuple[InternVLChatModel, object]:
    """A chat model from a backbone, an LLM and a fresh (or given) projector; returns ``(model, tokenizer)``.

    ``backbone``: an ``InternViT`` or any checkpoint ``InternViT.from_pretrained`` reads (an HF directory written
    by ``tools/export_to_chat.py``, an original ``.pth``, an MMEngine checkpoint, a chat directory).
    ``llm``: a transformers causal LM or its directory; ``tokenizer`` defaults to the one in that directory.
    ``projector``: the published projector file (``mlp_projector/*.pth``) or a chat checkpoint directory to take
    ``mlp1`` from (``read_projector``).
    The tokenizer gets the image tokens (and the template's special tokens) and the LLM embeddings grow to match.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    settings = settings or ChatSettings()
    dtype = _dtype(dtype)
    vision = backbone if isinstance(backbone, InternViT) else InternViT.from_pretrained(str(backbone))
    if vision.frozen:
        raise ValueError('the backbone was built with frozen=True; build it unfrozen and use '
                         'model.set_trainable(backbone=False) to freeze it in the chat model')
    if isinstance(llm, nn.Module):
        language_model = llm
    else:
        language_model = AutoModelForCausalLM.from_pretrained(str(llm), dtype=dtype or torch.float32,
                                                              attn_implementation=attn_implementation,
                                                              trust_remote_code=trust_remote_code)
    if tokenizer is None:
        if isinstance(llm, nn.Module):
            raise ValueError('pass the tokenizer when the LLM is given as a model')
        tokenizer = AutoTokenizer.from_pretrained(str(llm), trust_remote_code=trust_remote_code)
    model = InternVLChatModel(vision, language_model, settings)
    added = prepare_tokenizer(tokenizer, settings.template, model)
    if added:
        logger.info(f'added tokens {", ".join(added)} to the tokenizer ({len(tokenizer)} tokens)')
    if projector is not None:
        load_projector(model, read_projector(projector), source=str(projector))
    if dtype is not None:
        model.to(dtype)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------- writing
def chat_config(model: InternVLChatModel, dtype: torch.dtype) -> dict:
    """config.json for the model in the published layout."""
    vision = hf_config_from_arch(model.vision_model.arch)
    vision['torch_dtype'] = str(dtype).replace('torch.', '')
    llm = model.language_model.config.to_dict()
    llm['architectures'] = llm.get('architectures') or [type(model.language_model).__name__]
    # The published InternVLChatConfig forces tie_word_embeddings=False on every LLM, so its loader expects a
    # separate language_model.lm_head.weight; save_chat_model writes one (a copy when the LLM ties them).
    llm['tie_word_embeddings'] = False
    config = {
        'architectures': ['InternVLChatModel'],
        'model_type': 'internvl_chat',
        'vision_config': vision,
        'llm_config': llm,
        **model.settings.to_config(),
        'force_image_size': model.image_size,
        'use_backbone_lora': 0,
        'use_llm_lora': 0,
        'torch_dtype': str(dtype).replace('torch.', ''),
    }
    if model.img_context_token_id is not None:
        config['img_context_token_id'] = int(model.img_context_token_id)
    return config


def _untie(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share storage (tied LLM embeddings): safetensors stores each once."""
    seen: set = set()
    out = {}
    for name, tensor in state_dict.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride()) if tensor.device.type != 'meta' and tensor.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[name] = tensor
    return out


def _with_output_embeddings(model: InternVLChatModel, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the LLM's output-embedding weight under its own name when the LLM ties it to the input embeddings
    (the published layout always holds ``language_model.lm_head.weight``)."""
    llm = model.language_model
    output, inputs = llm.get_output_embeddings(), llm.get_input_embeddings()
    if output is None:
        return tensors
    out_name = next((n for n, m in llm.named_modules(remove_duplicate=False) if m is output), None)
    in_name = next((n for n, m in llm.named_modules(remove_duplicate=False) if m is inputs), None)
    out_key, in_key = f'{LLM_PREFIX}{out_name}.weight', f'{LLM_PREFIX}{in_name}.weight'
    if out_key not in tensors and in_key in tensors:
        tensors[out_key] = tensors[in_key].detach().clone()  # its own storage: safetensors refuses shared tensors
    return tensors


def _remote_code_files(llm: nn.Module) -> list[Path]:
    """The Python files of an LLM loaded as remote code (``auto_map``): the saved directory must ship them, as the
    published V1-5 directories ship ``modeling_internlm2.py``."""
    files = []
    for obj in (llm, llm.config):
        module = sys.modules.get(type(obj).__module__)
        path = Path(getattr(module, '__file__', '') or '')
        if module is not None and type(obj).__module__.startswith('transformers_modules.') and path.is_file():
            files += [f for f in path.parent.glob('*.py') if f.name != '__init__.py']
    return sorted(set(files))


def save_chat_model(model: InternVLChatModel, out_dir: str | os.PathLike, *, tokenizer=None, dtype=None,
                    overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    state_dict: Mapping[str, torch.Tensor] | None = None, in_place: bool = False) -> Path:
    """Write the published layout: config.json, safetensors shards (+ index), the tokenizer if given.

    ``dtype``: cast floating tensors (default: the model's dtype). ``state_dict``: tensors to write instead of
    ``model.state_dict()`` (a gathered ZeRO-3 state dict). The directory appears complete or not at all; an
    existing one is refused unless ``overwrite``. ``in_place`` writes into an existing directory (a Trainer
    checkpoint folder that also holds optimizer state), each file renamed into place, config.json last.
    """
    out = Path(out_dir).expanduser().absolute()
    tensors = _with_output_embeddings(model, _untie(state_dict if state_dict is not None else model.state_dict()))
    dtype = _dtype(dtype) or model.mlp1[1].weight.dtype
    tensors = {k: (v.detach().to('cpu', dtype) if v.is_floating_point() else v.detach().cpu())
               for k, v in tensors.items()}
    config = chat_config(model, dtype)

    def write(directory: Path) -> None:
        save_safetensors_shards(tensors, directory, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        for source in _remote_code_files(model.language_model):
            shutil.copyfile(source, directory / source.name)
        json_dump(config, directory / 'config.json')

    if in_place:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob('model-*-of-*.safetensors'):
            stale.unlink()
        write(out)
    else:
        with atomic_dir(out, overwrite) as tmp:
            write(tmp)
    logger.info(f'wrote InternVL-Chat checkpoint {out} ({len(tensors)} tensors, {config["torch_dtype"]})')
    return out
