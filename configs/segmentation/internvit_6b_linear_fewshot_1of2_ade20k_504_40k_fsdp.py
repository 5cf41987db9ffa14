# Few-shot ADE20K, 1/2 of the training images, 40k iterations, 800 warm-up iterations; published 55.8 mIoU.
# Otherwise as the 1/1 config; the test pipeline is the published subsets' one (fit into 2016 x 504, multiple of 14).
_base_ = ['./internvit_6b_linear_fewshot_1of1_ade20k_504_80k_fsdp.py']
fraction = 1 / 2
max_iters = 40000
train_dataloader = dict(dataset=dict(fraction=fraction))
val_dataloader = dict(dataset=dict(pipeline={{_base_.subset_test_pipeline}}))
test_dataloader = val_dataloader
param_scheduler = [dict(type='PolyLRWithLinearWarmup', power=1.0, eta_min=0.0, warmup_iters=800, warmup_ratio=1e-6,
                        by_epoch=False, begin=0, end=max_iters)]
train_cfg = dict(max_iters=max_iters)
