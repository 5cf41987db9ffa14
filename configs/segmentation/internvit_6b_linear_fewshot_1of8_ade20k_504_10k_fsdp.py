# Few-shot ADE20K, 1/8 of the training images, 10k iterations, 200 warm-up iterations; published 50.0 mIoU.
# Otherwise as the 1/1 config; the test pipeline is the published subsets' one (fit into 2016 x 504, multiple of 14).
_base_ = ['./internvit_6b_linear_fewshot_1of1_ade20k_504_80k_fsdp.py']
fraction = 1 / 8
max_iters = 10000
train_dataloader = dict(dataset=dict(fraction=fraction))
val_dataloader = dict(dataset=dict(pipeline={{_base_.subset_test_pipeline}}))
test_dataloader = val_dataloader
param_scheduler = [dict(type='PolyLRWithLinearWarmup', power=1.0, eta_min=0.0, warmup_iters=200, warmup_ratio=1e-6,
                        by_epoch=False, begin=0, end=max_iters)]
train_cfg = dict(max_iters=max_iters)
