"""Supervised fine-tuning of InternVL-Chat with the Hugging Face Trainer (DeepSpeed ZeRO-1/2/3 optional).

Arguments are three dataclasses parsed by ``HfArgumentParser`` (``tools/chat_sft.py``): ``ModelArguments`` and
``DataArguments`` below (names follow the published InternVL-Chat fine-tuning scripts: ``--freeze_backbone``,
``--unfreeze_vit_layers``, ``--conv_style``, ``--max_seq_length`` ...) and transformers' ``TrainingArguments``
(``--output_dir``, ``--learning_rate``, ``--bf16``, ``--gradient_checkpointing``, ``--deepspeed CONFIG.json`` ...).
A JSON file with the same keys can stand in for the command line, followed by overrides.

deepspeed is an optional extra: nothing imports it unless ``--deepspeed`` is given, and then a missing package is
reported before anything else happens.

Data: ``--meta_path`` (the published meta file) or ``--data FILE.jsonl``; see ``chat.data``. The published V1-2
recipe switches are here: ``--drop_path_rate``, ``--group_by_length``, ``--unfreeze_vit_layers N`` (layers[N:]),
``--mlp_path`` (the pre-trained projector file); ``--trust_remote_code`` lets a V1-5 checkpoint's InternLM2 code run.

Checkpoints (``output_dir/checkpoint-N``) and the final model (``output_dir``) are InternVL-Chat directories in
the published layout, with the tokenizer; ``--resume_from_checkpoint latest`` continues from the newest complete
one (an interrupted save, without ``trainer_state.json``, is passed over).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .checkpoint import (
    build_from_parts,
    load_chat_model,
    load_projector,
    load_tokenizer,
    read_projector,
    save_chat_model,
)
from .data import ON_BAD_RECORD, RECORD_RULES, TRUNCATION, SFTCollator, SFTDataset, load_meta_file
from .model import ChatSettings

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        'help': 'an InternVL-Chat checkpoint directory (published layout) to fine-tune'})
    vision_path: str | None = field(default=None, metadata={
        'help': 'or build from parts: a backbone checkpoint (e.g. written by tools/export_to_chat.py)'})
    llm_path: str | None = field(default=None, metadata={'help': 'with --vision_path: an LLM directory (HF)'})
    mlp_path: str | None = field(default=None, metadata={
        'help': 'the pre-trained projector: the published mlp_projector/*.pth file (a bare mlp1 state dict) or a '
                'chat checkpoint directory to take mlp1 from (default with --vision_path: a fresh projector)'})
    trust_remote_code: bool = field(default=False, metadata={
        'help': 'allow LLM/tokenizer code shipped in the checkpoint directory (e.g. modeling_internlm2.py of the '
                'V1-5 checkpoints) to run'})
    conv_style: str | None = field(default=None, metadata={
        'help': "template: internvl_zh (V1-1), Hermes-2 (V1-2), internlm2-chat (V1-5), phi3-chat, internvl2_5, plain"})
    vision_select_layer: int | None = field(default=None, metadata={'help': 'backbone layer to use (-1: last)'})
    down_sample_ratio: float | None = field(default=None, metadata={'help': 'pixel-shuffle ratio (0.5)'})
    ps_version: str | None = field(default=None, metadata={'help': "pixel-shuffle order 'v1' or 'v2'"})
    force_image_size: int | None = field(default=None, metadata={'help': 'tile size in pixels (448)'})
    model_dtype: str = field(default='float32', metadata={
        'help': 'dtype of the weights (float32 keeps fp32 master weights under --bf16 autocast; bfloat16 with '
                'DeepSpeed bf16)'})
    attn_implementation: str = field(default='sdpa', metadata={'help': "the LLM's attention: sdpa, eager, ..."})
    freeze_backbone: bool = field(default=False, metadata={'help': 'freeze the vision backbone'})
    freeze_llm: bool = field(default=False, metadata={'help': 'freeze the language model'})
    freeze_mlp: bool = field(default=False, metadata={'help': 'freeze the projector (mlp1)'})
    unfreeze_vit_layers: int = field(default=0, metadata={
        'help': 'as published: train backbone layers[N:] even with --freeze_backbone (negative N: the last -N '
                'layers; 0: none)'})
    unfreeze_last_vit_layers: int = field(default=0, metadata={
        'help': 'train the last N backbone layers even with --freeze_backbone'})
    drop_path_rate: float = field(default=0.0, metadata={
        'help': 'stochastic depth of the backbone, linear from 0 to this rate at the last layer (V1-2: 0.4)'})


@dataclass
class DataArguments:
    meta_path: str | None = field(default=None, metadata={
        'help': 'the published meta file: {name: {root, annotation (.jsonl), data_augment, repeat_time, length, '
                '[max_dynamic_patch]}}'})
    data: list[str] = field(default_factory=list, metadata={'help': 'or LLaVA-style .json/.jsonl files'})
    image_root: str | None = field(default=None, metadata={'help': "with --data: image folder (default: each "
                                                                   "file's folder)"})
    max_seq_length: int = field(default=2048, metadata={'help': 'maximum tokens per sample'})
    truncation: str = field(default='tokens', metadata={
        'help': "'tokens' (published): cut at max_seq_length, a record whose images are cut off is bad; 'turns': "
                "drop trailing rounds of over-long records; 'none': over-long records are bad"})
    record_rules: str = field(default='published', metadata={
        'help': "'published': read records as the published code does; 'strict': the project's stricter checks"})
    group_by_length: bool = field(default=False, metadata={
        'help': 'batch records of similar token length together (the published V1-2 recipe sets it), using the '
                "lengths the dataset scan measured"})
    on_bad_record: str = field(default='skip', metadata={
        'help': "'skip' bad records (listed in output_dir/bad_records.jsonl) or stop with an 'error'"})
    dynamic_image_size: bool | None = field(default=None, metadata={'help': 'dynamic-resolution tiles'})
    use_thumbnail: bool | None = field(default=None, metadata={'help': 'add a thumbnail tile (dynamic)'})
    min_dynamic_patch: int | None = field(default=None, metadata={'help': 'minimum tiles (dynamic)'})
    max_dynamic_patch: int | None = field(default=None, metadata={'help': 'maximum tiles (dynamic)'})
    system_message: str | None = field(default=None, metadata={'help': "override the template's system message"})
    overwrite_output: bool = field(default=False, metadata={
        'help': 'allow writing the final model over one already in output_dir'})


SETTING_ARGS = {  # argument -> ChatSettings field
    'conv_style': 'template', 'vision_select_layer': 'select_layer', 'down_sample_ratio': 'downsample_ratio',
    'ps_version': 'ps_version', 'force_image_size': 'force_image_size',
    'dynamic_image_size': 'dynamic_image_size', 'use_thumbnail': 'use_thumbnail',
    'min_dynamic_patch': 'min_dynamic_patch', 'max_dynamic_patch': 'max_dynamic_patch',
}


def _setting_overrides(model_args: ModelArguments, data_args: DataArguments) -> dict:
    given = {}
    for arg, setting in SETTING_ARGS.items():
        source = model_args if hasattr(model_args, arg) else data_args
        value = getattr(source, arg)
        if value is not None:
            given[setting] = value
    return given


def build_model(model_args: ModelArguments, data_args: DataArguments):
    """``(model, tokenizer)`` from a chat checkpoint or from parts, with the settings given on the command line."""
    overrides = _setting_overrides(model_args, data_args)
    if model_args.model_name_or_path:
        if model_args.vision_path or model_args.llm_path:
            raise ValueError('give either --model_name_or_path or --vision_path with --llm_path, not both')
        model = load_chat_model(model_args.model_name_or_path, dtype=model_args.model_dtype,
                                attn_implementation=model_args.attn_implementation,
                                trust_remote_code=model_args.trust_remote_code)
        tokenizer = load_tokenizer(model_args.model_name_or_path, model,
                                   trust_remote_code=model_args.trust_remote_code)
        if model_args.mlp_path:
            load_projector(model, read_projector(model_args.mlp_path), source=model_args.mlp_path)
        ratio = overrides.pop('downsample_ratio', model.settings.downsample_ratio)
        if ratio != model.settings.downsample_ratio:
            raise ValueError(f'--down_sample_ratio {ratio} differs from the checkpoint\'s '
                             f'{model.settings.downsample_ratio}: the projector input width would not match')
        for name, value in overrides.items():
            if getattr(model.settings, name) != value:
                logger.info(f'setting {name}: {getattr(model.settings, name)!r} -> {value!r} (command line)')
                setattr(model.settings, name, value)
        ChatSettings(**model.settings.to_config())  # re-validate
    elif model_args.vision_path and model_args.llm_path:
        model, tokenizer = build_from_parts(model_args.vision_path, model_args.llm_path,
                                            settings=ChatSettings(**overrides),
                                            projector=model_args.mlp_path, dtype=model_args.model_dtype,
                                            attn_implementation=model_args.attn_implementation,
                                            trust_remote_code=model_args.trust_remote_code)
    else:
        raise ValueError('no model: give --model_name_or_path CHAT_DIR, or --vision_path BACKBONE --llm_path LLM_DIR')
    counts = model.set_trainable(backbone=not model_args.freeze_backbone, llm=not model_args.freeze_llm,
                                 projector=not model_args.freeze_mlp,
                                 unfreeze_vit_layers=model_args.unfreeze_vit_layers,
                                 unfreeze_backbone_last=model_args.unfreeze_last_vit_layers)
    if model_args.drop_path_rate:
        model.set_drop_path_rate(model_args.drop_path_rate)
    if not any(counts.values()):
        raise ValueError('every part is frozen: nothing to train')
    logger.info('trainable parameters: ' + ', '.join(f'{k} {v:,}' for k, v in counts.items()))
    return model, tokenizer


def _trainer_class():
    from transformers import Trainer

    class ChatTrainer(Trainer):
        """Trainer whose model saves are InternVL-Chat directories in the published layout."""

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy == 'group_by_length' and hasattr(dataset, 'lengths'):
                from transformers.trainer_pt_utils import LengthGroupedSampler
                # the scan's token counts: no pass over the data (which would decode every image) to measure them
                return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                            lengths=dataset.lengths)
            return super()._get_train_sampler(train_dataset)

        def _save(self, output_dir: str | None = None, state_dict=None):
            output_dir = output_dir or self.args.output_dir
            save_chat_model(self.model, output_dir, tokenizer=self.processing_class, state_dict=state_dict,
                            in_place=True)
            Path(output_dir, 'training_args.json').write_text(self.args.to_json_string())

    return ChatTrainer


def run_sft(model_args: ModelArguments, data_args: DataArguments, training_args) -> dict:
    """Fine-tune; returns metrics with the first and last logged training loss."""
    from transformers import set_seed

    if data_args.on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f'--on_bad_record must be one of {ON_BAD_RECORD}, got {data_args.on_bad_record!r}')
    if data_args.truncation not in TRUNCATION:
        raise ValueError(f'--truncation must be one of {TRUNCATION}, got {data_args.truncation!r}')
    if data_args.record_rules not in RECORD_RULES:
        raise ValueError(f'--record_rules must be one of {RECORD_RULES}, got {data_args.record_rules!r}')
    if bool(data_args.data) == bool(data_args.meta_path):
        raise ValueError('give the training data as --meta_path META.json or as --data FILE [FILE ...] (not both)')
    if data_args.meta_path and data_args.image_root:
        raise ValueError('--image_root goes with --data; a meta file gives each dataset its root')
    sources = load_meta_file(data_args.meta_path) if data_args.meta_path else data_args.data
    out = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if resume == 'latest':
        resume = latest_complete_checkpoint(out)
        if resume is None:
            raise FileNotFoundError(f'--resume_from_checkpoint latest: no complete checkpoint-* folder in {out}')
    if data_args.group_by_length:
        training_args.train_sampling_strategy = 'group_by_length'
    if (out / 'config.json').exists() and not (data_args.overwrite_output or resume):
        raise FileExistsError(f'{out} already holds a model (config.json); pass --overwrite_output to replace it '
                              'or --resume_from_checkpoint latest to continue')
    training_args.remove_unused_columns = False  # the collator builds exactly what forward takes
    training_args.label_names = ['labels']
    set_seed(training_args.seed)

    model, tokenizer = build_model(model_args, data_args)
    dataset = SFTDataset.for_model(
        model, tokenizer, sources, image_root=data_args.image_root, max_length=data_args.max_seq_length,
        truncation=data_args.truncation, record_rules=data_args.record_rules, on_bad_record=data_args.on_bad_record,
        system_message=data_args.system_message, report_file=out / 'bad_records.jsonl', seed=training_args.seed)
    trainer = _trainer_class()(model=model, args=training_args, train_dataset=dataset,
                               data_collator=SFTCollator(tokenizer), processing_class=tokenizer)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out))
    trainer.save_state()
    losses = [entry['loss'] for entry in trainer.state.log_history if 'loss' in entry]
    metrics = dict(result.metrics, num_examples=len(dataset), num_bad_records=len(dataset.bad_records))
    if losses:
        metrics.update(first_logged_loss=losses[0], last_logged_loss=losses[-1])
    logger.info(f'SFT done: {json.dumps(metrics)}; model in {out}')
    return metrics


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` folder that was written to the end, or None.

    The Trainer writes ``trainer_state.json`` last, after the model (whose ``config.json`` this project writes
    last) and the optimizer state; a folder without both is a save that was interrupted and is passed over.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return None
    steps = []
    for folder in out.iterdir():
        match = re.fullmatch(r'checkpoint-(\d+)', folder.name)
        if match and folder.is_dir():
            steps.append((int(match.group(1)), folder))
    for _, folder in sorted(steps, reverse=True):
        if (folder / 'trainer_state.json').is_file() and (folder / 'config.json').is_file():
            return str(folder)
        logger.warning(f'{folder} is incomplete (no trainer_state.json or config.json: an interrupted save); '
                  'skipped')
    return None


def _deepspeed_config(argv: Sequence[str], json_args: dict) -> str | None:
    for i, arg in enumerate(argv):
        if arg == '--deepspeed' and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith('--deepspeed='):
            return arg.split('=', 1)[1]
    return json_args.get('deepspeed')


def parse_args(argv: Sequence[str] | None = None):
    """``(ModelArguments, DataArguments, TrainingArguments)`` from the command line (or a JSON file + overrides)."""
    from transformers import HfArgumentParser, TrainingArguments
    argv = list(sys.argv[1:] if argv is None else argv)
    json_args: dict = {}
    if argv and argv[0].endswith('.json') and not argv[0].startswith('-'):
        config_file = Path(argv.pop(0))
        try:
            json_args = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f'cannot read SFT config {config_file}: {err}') from None
        json_args = {k: v for k, v in json_args.items() if not k.startswith('_')}  # '_comment' keys
    ds_config = _deepspeed_config(argv, json_args)
    if ds_config:
        if not Path(ds_config).is_file():
            raise SystemExit(f'DeepSpeed config {ds_config} does not exist (see configs/chat/zero*.json)')
        if importlib.util.find_spec('deepspeed') is None:
            raise SystemExit(f'--deepspeed {ds_config} needs the deepspeed package, an optional extra for GPU '
                             "clusters: pip install deepspeed (part of the project's [gpu] extra)")
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if json_args:
        known = {f for dc in (ModelArguments, DataArguments, TrainingArguments)
                 for f in dc.__dataclass_fields__}
        unknown = sorted(set(json_args) - known)
        if unknown:
            raise SystemExit(f'unknown keys in the SFT config {config_file}: {", ".join(unknown)}')
        parser.set_defaults(**json_args)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, training_args


def main(argv: Sequence[str] | None = None) -> dict:
    if not logging.getLogger().handlers:  # a command-line run: show the progress lines of chat and backbones
        logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(levelname)s: %(message)s')
    return run_sft(*parse_args(argv))


if __name__ == '__main__':
    main()
