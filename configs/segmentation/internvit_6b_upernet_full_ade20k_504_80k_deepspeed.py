# Full tuning of InternViT-6B + UperNet with DeepSpeed ZeRO-3 instead of FSDP (needs `pip install deepspeed`).
# DeepSpeed's bf16 mode runs the whole model (heads too) in bf16 with fp32 master weights in the optimizer.
#   bash tools/dist_train.sh configs/segmentation/internvit_6b_upernet_full_ade20k_504_80k_deepspeed.py 8
_base_ = ['../_base_/models/internvit_6b_upernet.py', '../_base_/datasets/ade20k_504.py',
          '../_base_/default_runtime.py', '../_base_/schedules/schedule_80k.py']
model = dict(backbone=dict(frozen=False, dtype='bfloat16', drop_path_rate=0.4, grad_checkpointing=True))
optim_wrapper = dict(
    _delete_=True, type='DeepSpeedOptimWrapper',
    optimizer=dict(type='AdamW', lr=4e-5, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='InternViTLayerDecayOptimizerConstructor', paramwise_cfg=dict(layer_decay_rate=0.95))
runner_type = 'FlexibleRunner'
strategy = dict(
    type='DeepSpeedStrategy',
    zero_optimization=dict(stage=3, overlap_comm=True, contiguous_gradients=True,
                           stage3_gather_16bit_weights_on_model_save=True),
    bf16=dict(enabled=True),
    train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
    inputs_to_half=['inputs'])  # images enter the bf16 model in bf16
