"""Supervised fine-tuning of InternVL-Chat (Hugging Face Trainer; DeepSpeed ZeRO-1/2/3 via --deepspeed).

    # fine-tune a chat checkpoint, backbone frozen except its last 4 layers (layers[-4:], as published)
    python tools/chat_sft.py --model_name_or_path CHAT_DIR --data train.jsonl --output_dir work_dirs/sft \\
        --freeze_backbone True --unfreeze_vit_layers -4 --bf16 True --learning_rate 1e-5
    # or a JSON file of the same arguments, with overrides after it
    torchrun --nproc_per_node 8 tools/chat_sft.py configs/chat/internvl_chat_v1_2_finetune.json \\
        --model_name_or_path CHAT_DIR --data train.jsonl --output_dir work_dirs/sft

See ``chat/sft.py`` for every argument (``--help``).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chat.sft import main  # noqa: E402

if __name__ == '__main__':
    main()
