# Full tuning of InternViT-6B + UperNet: drop path 0.4, layer decay 0.95, wd 0.05; published 58.9 mIoU.
# 6B with AdamW does not fit plain DDP on 80 GB cards: FlexibleRunner + FSDP, one shard unit per block (bf16
# compute, fp32 master weights), heads fp32 under AMP, activation checkpointing in every block. InternViTFSDPStrategy
# starts the backbone on the meta device and loads each block's shard from the checkpoint (bounded host memory).
#   bash tools/dist_train.sh configs/segmentation/internvit_6b_upernet_full_ade20k_504_80k_fsdp.py 8
_base_ = ['../_base_/models/internvit_6b_upernet.py', '../_base_/datasets/ade20k_504.py',
          '../_base_/default_runtime.py', '../_base_/schedules/schedule_80k.py']
model = dict(backbone=dict(frozen=False, dtype=None, drop_path_rate=0.4, grad_checkpointing=True))
optim_wrapper = dict(use_fsdp=True, paramwise_cfg=dict(layer_decay_rate=0.95))
runner_type = 'FlexibleRunner'
strategy = dict(type='InternViTFSDPStrategy', state_dict_cfg='full',  # one checkpoint file, exportable to InternVL-Chat
                model_wrapper=dict(type='InternViTBlockFSDP', block_param_dtype='bfloat16'))
