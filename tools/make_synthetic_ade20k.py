"""Write the synthetic segmentation dataset (ADE20K folder layout, 5 classes, label 0 unlabeled/ignored).

    python tools/make_synthetic_ade20k.py [--out data/synthetic_ade20k] [--num-train 200] [--num-val 40]
                                          [--size 168] [--seed 0] [--overwrite]

See ``segmentation/synthetic.py`` for what the images hold. The folder is written beside its final place and
renamed when complete; an existing folder is only replaced with ``--overwrite``.
"""
import argparse
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='data/synthetic_ade20k', help='dataset root to create')
    parser.add_argument('--num-train', type=int, default=200)
    parser.add_argument('--num-val', type=int, default=40)
    parser.add_argument('--size', type=int, default=168, help='typical image side (sizes vary by +-15%%)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--overwrite', action='store_true', help='replace an existing dataset folder')
    args = parser.parse_args(argv)
    from segmentation.synthetic import CLASSES, write_synthetic_ade20k  # after parsing: --help answers at once
    start = time.time()
    out = write_synthetic_ade20k(args.out, args.num_train, args.num_val, args.size, args.seed, args.overwrite)
    print(f'wrote {args.num_train} training and {args.num_val} validation images ({len(CLASSES)} classes: '
          f'{", ".join(CLASSES)}) to {out} in {time.time() - start:.1f}s')


if __name__ == '__main__':
    main()
