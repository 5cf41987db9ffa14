"""Training speed and peak memory of a segmentation config at its real size (one process, synthetic batches).

    python tools/benchmark_segmentation.py CONFIG [--iters 30] [--warmup 5] [--batch 2] [--device cuda|cpu]
                                          [--cfg-options k=v ...]

Builds the config's model (random weights: ``pretrained`` is dropped, speed does not depend on the values) and its
optimizer wrapper (AMP, layer decay), then times full training steps -- data preprocessing, forward, loss,
backward, optimizer step -- on random images of the training crop size with random labels; data loading is not
included. Prints iterations/s, images/s, the backbone's forward TFLOP/s and peak memory (GPU: allocated and
reserved by PyTorch; CPU: peak resident set size of the process).

Targets (issue 3; one H200, 504 crop, 2 images per iteration, InternViT-6B):
    configs/segmentation/internvit_6b_linear_frozen_ade20k_504_80k.py    >= 12 it/s
    configs/segmentation/internvit_6b_upernet_frozen_ade20k_504_80k.py   >= 4 it/s, peak memory <= 40 GiB

On a CPU the 6B configs are far too large; shrink them with --cfg-options, e.g.

    python tools/benchmark_segmentation.py configs/segmentation/internvit_6b_upernet_frozen_ade20k_504_80k.py \\
        --device cpu --cfg-options model.backbone.preset=internvit_tiny model.backbone.out_indices=[0,1,2,3] \\
        model.neck.in_channels=64 model.decode_head.in_channels=[64,64,64,64] model.decode_head.channels=32 \\
        model.auxiliary_head.in_channels=64 model.data_preprocessor.size=[112,112]

FSDP / DeepSpeed configs are timed as one plain process (the strategy is not used).
"""
import argparse
import os.path as osp
import resource
import time

GiB = 1024 ** 3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n\n', 1)[1])
    parser.add_argument('config')
    parser.add_argument('--iters', type=int, default=30, help='timed training iterations')
    parser.add_argument('--warmup', type=int, default=5, help='untimed iterations first')
    parser.add_argument('--batch', type=int, default=None, help="images per iteration (default: the config's)")
    parser.add_argument('--device', default=None, help='default: cuda where available, else cpu')
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE')
    return parser.parse_args(argv)


def synthetic_batch(batch: int, size, num_classes: int, generator) -> dict:
    import torch
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    h, w = size
    inputs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for _ in range(batch)]
    samples = []
    for _ in range(batch):
        labels = torch.randint(0, num_classes, (1, h, w), generator=generator)
        labels[:, :h // 16] = 255  # some ignored pixels, as in real annotations
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        sample.gt_sem_seg = PixelData(data=labels)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def main(argv=None):
    args = parse_args(argv)
    # Heavy imports once the arguments are parsed, so that --help answers at once.
    import torch
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import mm_adapter  # noqa: F401  (mmcv.ops shim before mmseg)
    import segmentation  # noqa: F401
    from backbones import vit_forward_flops
    from mm_adapter.runtime import adapt_to_cpu, cfg_options
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(cfg_options(args.cfg_options))
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cpu':
        adapt_to_cpu(cfg)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    cfg.model.backbone.pretrained = None
    batch = args.batch or cfg.train_dataloader.batch_size
    size = tuple(cfg.model.data_preprocessor.size)
    num_classes = cfg.model.decode_head.num_classes

    torch.backends.cudnn.benchmark = bool(cfg.get('env_cfg', {}).get('cudnn_benchmark', False))
    model = revert_sync_batchnorm(MODELS.build(cfg.model)).to(device)  # one process: plain BatchNorm
    model.train()
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    backbone = model.backbone
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    where = (torch.cuda.get_device_name(device) if device.type == 'cuda'
             else f'CPU, {torch.get_num_threads()} intra-op thread(s)')
    print(f'{osp.basename(args.config)} on {where}: backbone {backbone.arch.embed_dim}x{backbone.depth}, '
          f'out_indices {backbone.out_indices}, '
          f'frozen={backbone.frozen}, dtype={backbone.compute_dtype}, '
          f'optimizer wrapper {type(optim_wrapper).__name__}, {trainable:,} trainable parameters, '
          f'batch {batch} x {size[0]}x{size[1]}', flush=True)
    if cfg.get('runner_type') == 'FlexibleRunner':
        print(f'note: the config trains with {cfg.strategy.type} on several GPUs; this times one plain process')

    generator = torch.Generator().manual_seed(0)
    data = synthetic_batch(batch, size, num_classes, generator)

    def step():
        return model.train_step(data, optim_wrapper)['loss'].item()

    for _ in range(args.warmup):
        loss = step()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        loss = step()  # .item() synchronizes with the device every step, as the runner's logging does
    elapsed = time.perf_counter() - start

    its = args.iters / elapsed
    depth = max(backbone.out_indices) + 1 if backbone.out_indices else backbone.depth
    flops = vit_forward_flops(backbone.arch, size[0], size[1], depth=depth) * batch * (1 if backbone.frozen else 3)
    print(f'training: {its:.2f} it/s, {its * batch:.1f} images/s, {elapsed / args.iters * 1000:.1f} ms/it, '
          f'backbone {"forward" if backbone.frozen else "forward+backward"} {flops * its / 1e12:.3g} TFLOP/s, '
          f'last loss {loss:.3f}')
    if device.type == 'cuda':
        print(f'peak memory: {torch.cuda.max_memory_allocated(device) / GiB:.2f} GiB allocated, '
              f'{torch.cuda.max_memory_reserved(device) / GiB:.2f} GiB reserved (timed iterations)')
    else:
        print(f'peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.2f} GiB resident '
              f'(whole process)')
    return its


if __name__ == '__main__':
    main()
