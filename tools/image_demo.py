"""Segment single images with a config and a checkpoint, as mmseg's demo does (mmseg.apis.init_model +
inference_model).

    python tools/image_demo.py CONFIG CHECKPOINT IMAGE [IMAGE ...] [--out DIR] [--opacity 0.5] [--device cpu]

For each image writes ``DIR/<name>.png`` (the image with the prediction overlaid in the dataset's palette) and
``DIR/<name>_labels.png`` (the raw label map: one class index per pixel, 8-bit, or 16-bit above 255 classes).
Existing files are refused unless ``--overwrite``. The checkpoint is read weights-only (any run's MMEngine
checkpoint or ``weights_iter_N.pth``).
"""
import argparse
import os
import os.path as osp


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Segment images: overlay PNG + raw label map per image')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files')
    parser.add_argument('--out', default='demo_out', help='output directory (default: demo_out)')
    parser.add_argument('--opacity', type=float, default=0.5, help='opacity of the painted prediction (0..1]')
    parser.add_argument('--device', default=None, help='cuda:0 when CUDA is available, else cpu')
    parser.add_argument('--overwrite', action='store_true', help='replace existing output files')
    args = parser.parse_args(argv)
    if not 0 < args.opacity <= 1:
        parser.error(f'--opacity must be in (0, 1], got {args.opacity}')
    return args


def main(argv=None):
    args = parse_args(argv)
    # heavy imports after parsing, so that --help answers at once; segmentation first (mmcv.ops shim before mmseg)
    import segmentation  # noqa: F401  (registrations, weights-only checkpoint loading)
    # isort: split
    import mmcv
    import numpy as np
    import torch
    from mmseg.apis import inference_model, init_model, show_result_pyplot

    for path, what in [(args.config, 'config'), (args.checkpoint, 'checkpoint')] + [(i, 'image') for i in args.images]:
        if not osp.isfile(path):
            raise FileNotFoundError(f'{what} file {path} does not exist')
    names = [osp.splitext(osp.basename(i))[0] for i in args.images]
    outputs = [osp.join(args.out, f'{n}{suffix}.png') for n in names for suffix in ('', '_labels')]
    existing = [o for o in outputs if osp.exists(o)]
    if existing and not args.overwrite:
        raise FileExistsError(f'{existing[0]} exists ({len(existing)} output files do); pass --overwrite or another '
                              f'--out')
    device = args.device or ('cuda:0' if torch.cuda.is_available() else 'cpu')
    model = init_model(args.config, args.checkpoint, device=device)
    os.makedirs(args.out, exist_ok=True)
    for image, name in zip(args.images, names):
        result = inference_model(model, image)
        show_result_pyplot(model, image, result, opacity=args.opacity, draw_gt=False, show=False,
                           out_file=osp.join(args.out, f'{name}.png'))
        labels = result.pred_sem_seg.data[0].cpu().numpy()
        labels = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)
        mmcv.imwrite(labels, osp.join(args.out, f'{name}_labels.png'))
        print(f'{image}: {osp.join(args.out, name)}.png, {name}_labels.png ({labels.shape[1]}x{labels.shape[0]}, '
              f'classes {sorted(np.unique(labels).tolist())[:10]})', flush=True)


if __name__ == '__main__':
    main()
