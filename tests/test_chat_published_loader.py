"""The published InternVLChatModel loads this project's exports: no missing or unexpected keys, the same logits.

Needs the published InternVL-Chat code, which CI does not have: set INTERNVL_CHAT_CODE to the ``internvl_chat``
folder of a checkout of github.com/OpenGVLab/InternVL (checked with commit 2410d1d); skipped otherwise. Its
modelling file imports peft and its InternLM2 / Phi-3 modelling files, which need transformers 4.x modules; the
LLMs here are Llama and Qwen2, so stand-ins take their place in ``sys.modules`` for this test only.
"""
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from chat import ChatSettings, load_chat_model, save_chat_model
from chat.checkpoint import build_from_parts, load_tokenizer
from chat.model import IMG_CONTEXT_TOKEN
from chat.tiny import build_tiny_parts

CODE = os.environ.get('INTERNVL_CHAT_CODE')
TOOL = Path(__file__).resolve().parents[1] / 'tools' / 'export_to_chat.py'
pytestmark = [pytest.mark.published_code,
              pytest.mark.skipif(not CODE or not Path(CODE, 'internvl', 'model').is_dir(),
                                 reason='set INTERNVL_CHAT_CODE to the published internvl_chat folder')]


@pytest.fixture()
def published_model_class(monkeypatch):
    monkeypatch.syspath_prepend(CODE)
    stand_ins = {'internvl.model.phi3.modeling_phi3': 'Phi3ForCausalLM',
                 'internvl.model.internlm2.modeling_internlm2': 'InternLM2ForCausalLM'}
    if importlib.util.find_spec('peft') is None:  # used by the published LoRA helpers only
        stand_ins['peft'] = 'LoraConfig'
    for name, attr in stand_ins.items():
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # transformers probes peft with find_spec
        setattr(module, attr, type(attr, (), {}))
        module.get_peft_model = None
        monkeypatch.setitem(sys.modules, name, module)
    for name in [n for n in sys.modules if n == 'internvl' or n.startswith('internvl.')]:
        if name not in stand_ins:
            monkeypatch.delitem(sys.modules, name)
    from internvl.model.internvl_chat import InternVLChatModel
    return InternVLChatModel


def tied_qwen2(vocab_size):
    from transformers import AutoModelForCausalLM, Qwen2Config
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation='sdpa')


def assert_published_loader_agrees(published_class, directory, model, tokenizer):
    published, info = published_class.from_pretrained(str(directory), torch_dtype=torch.float32,
                                                      output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'], info
    published.eval().img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, model.image_size, model.image_size)
    prompt = model.build_prompt('<image>\nwhat colour is the square?', num_patches_list=[2])
    ids = tokenizer(prompt + 'the square is red.', return_tensors='pt')['input_ids']
    flags = torch.ones(2, dtype=torch.long)
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels, image_flags=flags).logits
        theirs = published(pixel_values=pixels, input_ids=ids, image_flags=flags).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize('llm', ['llama', 'tied-qwen2'])
def test_published_loader_reads_save_chat_model(published_model_class, tmp_path, llm):
    backbone, language_model, tokenizer = build_tiny_parts(seed=0, image_size=56)
    if llm == 'tied-qwen2':
        language_model = tied_qwen2(len(tokenizer))
    model, tokenizer = build_from_parts(backbone, language_model, tokenizer, settings=ChatSettings())
    saved = save_chat_model(model.eval(), tmp_path / 'chat', tokenizer=tokenizer)
    assert_published_loader_agrees(published_model_class, saved, load_chat_model(saved), tokenizer)


def test_published_loader_reads_export_to_chat_into_chat(published_model_class, tmp_path):
    """tools/export_to_chat.py --into-chat: another backbone's weights in a copy of a chat directory."""
    chats = []
    for seed in (0, 1):
        backbone, language_model, tokenizer = build_tiny_parts(seed=seed, image_size=56)
        model, tokenizer = build_from_parts(backbone, language_model, tokenizer, settings=ChatSettings())
        chats.append(save_chat_model(model.eval(), tmp_path / f'chat{seed}', tokenizer=tokenizer))
    spec = importlib.util.spec_from_file_location('export_to_chat', TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / 'into'
    assert tool.main([str(chats[1]), str(out), '--into-chat', str(chats[0])]) == 0
    exported = load_chat_model(out)
    donor = load_chat_model(chats[1])
    for key, value in donor.vision_model.state_dict().items():
        assert torch.equal(exported.vision_model.state_dict()[key], value), key
    assert_published_loader_agrees(published_model_class, out, exported, load_tokenizer(out))
