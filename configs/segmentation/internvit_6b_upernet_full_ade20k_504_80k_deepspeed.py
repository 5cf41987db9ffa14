# Full tuning of InternViT-6B + UperNet with DeepSpeed ZeRO-3 instead of FSDP (needs `pip install deepspeed`).
# DeepSpeed's bf16 mode runs the whole model (heads too) in bf16 with fp32 master weights in the optimizer.
#   bash tools/dist_train.sh configs/segmentation/internvit_6b_upernet_full_ade20k_504_80k_deepspeed.py 8
# Checkpoints: the regular ones (`iter_N.pth/`, every 1000 iterations, the last two kept) and the best evaluation's
# (`best_mIoU_iter_N.pth/`, the published save_best) are DeepSpeed folders (ZeRO-3 shards with the optimizer state)
# for `--resume`; tools/export_to_chat.py and tools/test.py cannot read them. At the end of training
# FinalWeightsHook also writes `weights_iter_80000.pth`, an ordinary MMEngine checkpoint of the whole model in bf16
# (MMEngine's DeepSpeedStrategy saves without optimizer state as a plain file, gathering the ZeRO-3 partitions; this
# needs stage3_gather_16bit_weights_on_model_save=True below):
#   python tools/export_to_chat.py work_dirs/<run>/weights_iter_80000.pth OUT
# For a regular (intermediate) checkpoint, consolidate the ZeRO shards first with DeepSpeed's zero_to_fp32 (fp32
# weights; the keys are the segmentor's, `backbone.` prefixed). The checkpoint dir is the work dir, the tag the folder:
#   python -c "import torch; from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as g; \
#     torch.save({'state_dict': g('work_dirs/<run>', tag='iter_8000.pth')}, 'iter_8000_fp32.pth')"
# (DeepSpeed also copies its zero_to_fp32.py script into the work dir: `python zero_to_fp32.py WORK_DIR OUT -t TAG`.)
_base_ = ['../_base_/models/internvit_6b_upernet.py', '../_base_/datasets/ade20k_504.py',
          '../_base_/default_runtime.py', '../_base_/schedules/schedule_80k.py']
model = dict(backbone=dict(frozen=False, dtype='bfloat16', drop_path_rate=0.4, grad_checkpointing=True))
optim_wrapper = dict(
    _delete_=True, type='DeepSpeedOptimWrapper',
    optimizer=dict(type='AdamW', lr=4e-5, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='InternViTLayerDecayOptimizerConstructor', paramwise_cfg=dict(layer_decay_rate=0.95))
runner_type = 'FlexibleRunner'
strategy = dict(
    type='InternViTDeepSpeedStrategy',  # ZeRO-3 with the backbone partitioned at start-up (bounded host memory)
    zero_optimization=dict(stage=3, overlap_comm=True, contiguous_gradients=True,
                           stage3_gather_16bit_weights_on_model_save=True),
    bf16=dict(enabled=True),
    train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
    inputs_to_half=['inputs'])  # images enter the bf16 model in bf16
custom_hooks = [dict(type='FinalWeightsHook')]
