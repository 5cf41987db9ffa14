"""Supervised fine-tuning of InternVL-Chat (Hugging Face Trainer; DeepSpeed ZeRO-1/2/3 via --deepspeed).

    # fine-tune a chat checkpoint, backbone frozen except its last 4 layers (layers[-4:], as published)
    python tools/chat_sft.py --model_name_or_path CHAT_DIR --data train.jsonl --output_dir work_dirs/sft \\
        --freeze_backbone True --unfreeze_vit_layers -4 --bf16 True --learning_rate 1e-5
    # or a JSON file of the same arguments, with overrides after it
    torchrun --nproc_per_node 8 tools/chat_sft.py configs/chat/internvl_chat_v1_2_finetune.json \\
        --model_name_or_path CHAT_DIR --data train.jsonl --output_dir work_dirs/sft

Arguments: ``chat.sft.ModelArguments`` (--model_name_or_path, or --vision_path + --llm_path [--projector_path];
--conv_style, --freeze_backbone, --freeze_llm, --freeze_mlp, --unfreeze_vit_layers, --model_dtype ...),
``chat.sft.DataArguments`` (--data, --image_root, --max_seq_length, --truncation, --on_bad_record, dynamic tiles
...) and transformers' ``TrainingArguments`` (--output_dir, --learning_rate, --bf16, --deepspeed ...).
``--help`` prints this page at once; ``--help-all`` prints every argument (it imports transformers).
"""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ('-h', '--help') for a in argv):
        print(__doc__)
        return None
    argv = ['--help' if a == '--help-all' else a for a in argv]
    from chat.sft import main as sft_main
    return sft_main(argv)


if __name__ == '__main__':
    main()
