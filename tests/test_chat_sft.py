"""Chat SFT (HF Trainer) on tiny parts, DeepSpeed config hand-off, and backbones arriving bit-identical from
tools/export_to_chat.py (an original .pth and an MMEngine segmentation checkpoint)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from backbones.layouts import from_canonical
from backbones.writing import write_hf
from chat import ChatSettings, build_from_parts, load_chat_model, load_tokenizer, save_chat_model
from chat.sft import main as sft_main
from chat.sft import parse_args
from chat.tiny import build_tiny_parts, write_colour_dataset, write_tiny_llm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp('chat_parts')
    backbone, _, _ = build_tiny_parts(seed=0)
    write_hf(backbone.state_dict(), backbone.arch, root / 'vit', dtype='float32')
    write_tiny_llm(root / 'llm', seed=0)
    data = write_colour_dataset(root / 'data', copies=2)
    return root, backbone, data


def sft_args(root, data, out, *extra):
    return ['--vision_path', str(root / 'vit'), '--llm_path', str(root / 'llm'), '--data', str(data),
            '--output_dir', str(out), '--conv_style', 'plain', '--per_device_train_batch_size', '4',
            '--learning_rate', '3e-3', '--warmup_steps', '0', '--logging_steps', '4', '--save_strategy', 'no',
            '--report_to', 'none', '--use_cpu', 'True', '--disable_tqdm', 'True', '--seed', '0', *extra]


def test_short_sft_lowers_the_loss_and_respects_freezing(parts, tmp_path):
    root, backbone, data = parts
    out = tmp_path / 'sft'
    # --unfreeze_vit_layers -1: layers[-1:], the published meaning
    metrics = sft_main(sft_args(root, data, out, '--max_steps', '16', '--freeze_backbone', 'True',
                                '--unfreeze_vit_layers', '-1'))
    assert metrics['num_examples'] == 8 and metrics['num_bad_records'] == 0
    assert metrics['last_logged_loss'] < 0.85 * metrics['first_logged_loss'], metrics

    trained = load_chat_model(out)
    tokenizer = load_tokenizer(out, trained)
    assert trained.settings.template == 'plain'
    layers = trained.vision_model.encoder.layers
    for i, layer in enumerate(layers):
        same = all(torch.equal(p, q) for p, q in zip(layer.parameters(), backbone.encoder.layers[i].parameters()))
        assert same == (i < len(layers) - 1), f'layer {i}: frozen layers must not move, the last one must'
    assert torch.equal(trained.vision_model.embeddings.patch_embedding.weight,
                       backbone.embeddings.patch_embedding.weight)
    answer, history = trained.chat(tokenizer, torch.zeros(1, 3, 56, 56), 'what colour is the square?',
                                   dict(max_new_tokens=3), return_history=True)
    assert isinstance(answer, str) and history[0][1] == answer

    with pytest.raises(FileExistsError, match='already holds a model'):
        sft_main(sft_args(root, data, out, '--max_steps', '1'))


def test_resume_continues_from_the_latest_checkpoint(parts, tmp_path):
    root, _, data = parts
    out = tmp_path / 'run'
    args = sft_args(root, data, out, '--save_strategy', 'steps', '--save_steps', '2', '--logging_steps', '1')
    sft_main(args + ['--max_steps', '2'])
    saved = load_chat_model(out / 'checkpoint-2')
    # a newer save that was interrupted (no trainer_state.json) must be passed over
    (out / 'checkpoint-3').mkdir()
    (out / 'checkpoint-3' / 'config.json').write_text('{}')
    assert json.loads((out / 'checkpoint-2' / 'config.json').read_text())['architectures'] == ['InternVLChatModel']
    metrics = sft_main(args + ['--max_steps', '4', '--resume_from_checkpoint', 'latest'])
    state = json.loads((out / 'trainer_state.json').read_text())
    assert state['global_step'] == 4
    assert [e['step'] for e in state['log_history'] if 'loss' in e] == [1, 2, 3, 4]
    assert metrics['train_loss'] > 0
    # the resumed run started from checkpoint-2's weights: step 3 moved them, so they differ from the final ones
    final = load_chat_model(out)
    assert not torch.equal(saved.mlp1[1].weight, final.mlp1[1].weight)
    with pytest.raises(FileNotFoundError, match='no complete checkpoint-\\* folder'):
        sft_main(sft_args(root, data, tmp_path / 'empty', '--max_steps', '1', '--resume_from_checkpoint', 'latest'))


def test_bad_record_flag_stops_or_skips(parts, tmp_path):
    root, _, data = parts
    bad = tmp_path / 'bad.jsonl'
    bad.write_text(data.read_text() + json.dumps({'image': 'images/nope.png', 'conversations': [
        {'from': 'human', 'value': 'q'}, {'from': 'gpt', 'value': 'a'}]}) + '\n')
    args = sft_args(root, data, tmp_path / 'a', '--max_steps', '1', '--image_root', str(data.parent))
    args[args.index('--data') + 1] = str(bad)
    with pytest.raises(ValueError, match=r'bad.jsonl record 8 \(line 9\): image not found: .*nope.png'):
        sft_main(args + ['--on_bad_record', 'error'])
    metrics = sft_main(args)
    assert metrics['num_bad_records'] == 1
    report = [json.loads(line) for line in (tmp_path / 'a' / 'bad_records.jsonl').read_text().splitlines()]
    assert [r['index'] for r in report] == [8]


def test_deepspeed_configs_are_passed_through_without_importing_deepspeed(parts, tmp_path):
    stages = {}
    for path in sorted((REPO / 'configs' / 'chat').glob('zero_stage*.json')):
        config = json.loads(path.read_text())
        stages[path.name] = config['zero_optimization']['stage']
        # 'auto' only where the HF integration fills it from TrainingArguments (the chat model has no HF config)
        autos = {k for k, v in config.items() if v == 'auto'} | \
            {f'{k}.{kk}' for k, v in config.items() if isinstance(v, dict) for kk, vv in v.items() if vv == 'auto'}
        assert autos <= {'gradient_accumulation_steps', 'gradient_clipping', 'train_batch_size',
                         'train_micro_batch_size_per_gpu', 'bf16.enabled', 'fp16.enabled'}, autos
    assert stages == {'zero_stage1.json': 1, 'zero_stage2.json': 2, 'zero_stage3.json': 3,
                      'zero_stage3_config_34b.json': 3}
    zero3_34b = json.loads((REPO / 'configs' / 'chat' / 'zero_stage3_config_34b.json').read_text())
    assert zero3_34b['zero_optimization']['stage3_param_persistence_threshold'] == 1e5
    recipe = REPO / 'configs' / 'chat' / 'internvl_chat_v1_2_finetune.json'
    root, _, data = parts
    if 'deepspeed' not in sys.modules and not _has_deepspeed():
        with pytest.raises(SystemExit, match='needs the deepspeed package'):
            parse_args([str(recipe), '--data', str(data), '--output_dir', str(tmp_path)])
        assert 'deepspeed' not in sys.modules
    model_args, data_args, training_args = parse_args(
        [str(recipe), '--data', str(data), '--output_dir', str(tmp_path), '--deepspeed', '', '--use_cpu', 'True'])
    assert (training_args.learning_rate, training_args.weight_decay, data_args.max_seq_length) == (1e-5, 0.05, 2048)
    assert model_args.conv_style == 'Hermes-2' and training_args.activation_checkpointing
    assert (model_args.drop_path_rate, data_args.group_by_length) == (0.4, True)
    assert 'deepspeed' not in sys.modules or _has_deepspeed()


def _has_deepspeed():
    import importlib.util
    return importlib.util.find_spec('deepspeed') is not None


# ---------------------------------------------------------------------------------------------------- export tool
EXPORTS = textwrap.dedent('''
    import runpy, sys
    for argv in {runs!r}:
        sys.argv = ['tools/export_to_chat.py'] + argv
        try:
            runpy.run_path('tools/export_to_chat.py', run_name='__main__')
        except SystemExit as exit:
            if exit.code:
                raise
''')


def run_export_tool(runs):
    """tools/export_to_chat.py as its command line runs it, several times in one interpreter (start-up is slow)."""
    proc = subprocess.run([sys.executable, '-c', EXPORTS.format(runs=runs)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_backbones_exported_by_the_tool_arrive_bit_identical(tmp_path):
    backbone, _, _ = build_tiny_parts(seed=1)
    canonical = backbone.state_dict()
    write_tiny_llm(tmp_path / 'llm')
    # an original segmentation/classification .pth and an MMEngine segmentation checkpoint
    torch.save(from_canonical(canonical, 'original'), tmp_path / 'original.pth')
    torch.save({'meta': {}, 'state_dict': {**{f'backbone.{k}': v for k, v in canonical.items()},
                                           'decode_head.conv_seg.weight': torch.randn(150, 64, 1, 1)}},
               tmp_path / 'segmentation.pth')
    # a chat model with another backbone, to export into
    other, _, _ = build_tiny_parts(seed=2)
    chat, tokenizer = build_from_parts(other, tmp_path / 'llm', settings=ChatSettings(template='plain'))
    save_chat_model(chat, tmp_path / 'chat', tokenizer=tokenizer)

    run_export_tool([[str(tmp_path / 'original.pth'), str(tmp_path / 'from_pth'), '--image-size', '56',
                      '--dtype', 'float32', '--num-heads', '4'],
                     [str(tmp_path / 'segmentation.pth'), str(tmp_path / 'from_seg'), '--image-size', '56',
                      '--dtype', 'float32', '--num-heads', '4'],
                     [str(tmp_path / 'segmentation.pth'), str(tmp_path / 'chat_new'), '--into-chat',
                      str(tmp_path / 'chat')]])

    for exported in ('from_pth', 'from_seg'):
        model, _ = build_from_parts(tmp_path / exported, tmp_path / 'llm')
        got = model.vision_model.state_dict()
        assert got.keys() == canonical.keys()
        for k, v in canonical.items():
            assert torch.equal(got[k], v), f'{exported}: {k}'
    replaced = load_chat_model(tmp_path / 'chat_new')
    for k, v in canonical.items():
        assert torch.equal(replaced.vision_model.state_dict()[k], v), f'into-chat: {k}'
    for k, v in chat.state_dict().items():  # projector and LLM untouched
        if not k.startswith('vision_model.'):
            assert torch.equal(replaced.state_dict()[k], v), k


def test_v1_5_recipe_parses_with_the_published_values(parts, tmp_path):
    _, _, data = parts
    recipe = REPO / 'configs' / 'chat' / 'internvl_chat_v1_5_finetune.json'
    model_args, data_args, training_args = parse_args(
        [str(recipe), '--data', str(data), '--output_dir', str(tmp_path), '--deepspeed', '', '--use_cpu', 'True'])
    assert (model_args.conv_style, model_args.trust_remote_code, model_args.ps_version) == ('internlm2-chat', True,
                                                                                            'v2')
    assert (data_args.dynamic_image_size, data_args.use_thumbnail, data_args.max_dynamic_patch) == (True, True, 12)
    assert (data_args.max_seq_length, training_args.learning_rate, model_args.drop_path_rate) == (4096, 2e-5, 0.4)
