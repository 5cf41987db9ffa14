"""Plot a run's training curves (loss, learning rate, validation metrics) from MMEngine's ``scalars.json``.

    python tools/plot_logs.py WORK_DIR_OR_SCALARS_JSON [--keys loss lr mIoU] [--out curves.png]

WORK_DIR: a run's work dir (its latest ``<timestamp>/vis_data/scalars.json`` is used) or the JSON file itself.
One panel per key against the iteration; keys missing from the log are named in an error. Writes one PNG
(default: ``curves.png`` beside ``scalars.json``).
"""
import argparse
import glob
import json
import os
import os.path as osp
import sys


def find_scalars(path: str) -> str:
    if osp.isfile(path):
        return path
    found = sorted(glob.glob(osp.join(path, '*', 'vis_data', 'scalars.json')))
    if not found:
        raise FileNotFoundError(f'no <timestamp>/vis_data/scalars.json under {path} (is it a work dir of a run?)')
    return found[-1]


def read_series(scalars: str) -> dict:
    """{key: ([iterations], [values])} from the JSON lines MMEngine's LocalVisBackend writes."""
    series = {}
    with open(scalars) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f'{scalars} line {number} is not JSON: {err}') from None
            step = record.get('step', record.get('iter'))
            for key, value in record.items():
                if key not in ('step', 'iter', 'epoch') and isinstance(value, (int, float)):
                    xs, ys = series.setdefault(key, ([], []))
                    xs.append(step)
                    ys.append(value)
    return series


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description='Plot loss / lr / metric curves from scalars.json')
    parser.add_argument('path', help="a run's work dir or its scalars.json")
    parser.add_argument('--keys', nargs='+', default=['loss', 'lr', 'mIoU'], help='scalars to plot, one panel each')
    parser.add_argument('--out', help='PNG file (default: curves.png beside scalars.json)')
    args = parser.parse_args(argv)
    scalars = find_scalars(args.path)
    series = read_series(scalars)
    missing = [k for k in args.keys if k not in series]
    if missing:
        raise KeyError(f'{scalars} has no {", ".join(missing)}; it has: {", ".join(sorted(series))}')

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(args.keys), 1, figsize=(7, 2.6 * len(args.keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], args.keys):
        xs, ys = series[key]
        ax.plot(xs, ys, marker='o' if len(xs) < 20 else None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel('iteration')
    fig.suptitle(osp.relpath(scalars))
    fig.tight_layout()
    out = args.out or osp.join(osp.dirname(scalars), 'curves.png')
    tmp = f'{out}.tmp-{os.getpid()}.png'
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)
    plt.close(fig)
    print(f'wrote {out} ({", ".join(args.keys)} from {scalars})')
    return out


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f'plot_logs: error: {err}', file=sys.stderr)
        sys.exit(2)
