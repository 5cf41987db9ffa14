"""The sweep's held-out grid for a person: a feature x lr table (CSV and log text) and a heat map with the choice."""
from __future__ import annotations

import csv
import io
import os

from backbones.atomic import atomic_path, atomic_write


def heldout_grid(heads: list[dict]) -> tuple[list[str], list[float], list[list[float | None]]]:
    """(features, lrs, top1[feature][lr]) from ``heldout_selection.json``'s ``heads`` (None where no head)."""
    features = list(dict.fromkeys(h['feature'] for h in heads))
    lrs = sorted(set(float(h['lr']) for h in heads))
    grid = [[None] * len(lrs) for _ in features]
    for h in heads:
        grid[features.index(h['feature'])][lrs.index(float(h['lr']))] = float(h['heldout_top1'])
    return features, lrs, grid


def grid_csv(features, lrs, grid) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(['feature'] + [f'{lr:g}' for lr in lrs])
    for name, row in zip(features, grid):
        writer.writerow([name] + ['' if v is None else f'{v:.4f}' for v in row])
    return buf.getvalue()


def grid_text(features, lrs, grid, chosen: tuple[str, float]) -> str:
    """Fixed-width table; the chosen cell is starred."""
    corner = 'feature \\ lr'
    width = max(len(corner), *(len(f) for f in features))
    lines = [f'{corner:<{width}}' + ''.join(f'{lr:>9g}' for lr in lrs)]
    for name, row in zip(features, grid):
        cells = ''
        for lr, v in zip(lrs, row):
            mark = '*' if (name, lr) == chosen else ' '
            cells += '        -' if v is None else f'{v:>8.2f}{mark}'
        lines.append(f'{name:<{width}}' + cells)
    return '\n'.join(lines)


def write_heatmap(path: str | os.PathLike, features, lrs, grid, chosen: tuple[str, float], title: str) -> None:
    import numpy as np
    from matplotlib.figure import Figure  # a bare Figure draws with Agg and leaves pyplot's global backend alone
    from matplotlib.patches import Rectangle

    values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig = Figure(figsize=(1.0 + 0.8 * len(lrs), 1.2 + 0.5 * len(features)))
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap='viridis', aspect='auto')
    ax.set_xticks(range(len(lrs)), [f'{lr:g}' for lr in lrs])
    ax.set_yticks(range(len(features)), features)
    ax.set_xlabel('lr (per 512 images)')
    ax.set_ylabel('feature')
    ax.set_title(title)
    middle = (np.nanmin(values) + np.nanmax(values)) / 2
    for i in range(len(features)):
        for j in range(len(lrs)):
            if not np.isnan(values[i, j]):  # dark text on viridis' light (high) end
                ax.text(j, i, f'{values[i, j]:.1f}', ha='center', va='center', fontsize=7,
                        color='k' if values[i, j] > middle else 'w')
    i, j = features.index(chosen[0]), lrs.index(chosen[1])
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor='red', linewidth=2.5))
    fig.colorbar(im, ax=ax, label='held-out top-1 (%)')
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=100)


def write_sweep_report(work_dir: str | os.PathLike, selection: dict) -> str:
    """Write ``heldout_grid.csv`` and ``heldout_grid.png`` into ``work_dir``; return the table text for the log."""
    features, lrs, grid = heldout_grid(selection['heads'])
    best = next(h for h in selection['heads'] if h['name'] == selection['selected'])
    chosen = (best['feature'], float(best['lr']))
    atomic_write(os.path.join(work_dir, 'heldout_grid.csv'), grid_csv(features, lrs, grid))
    write_heatmap(os.path.join(work_dir, 'heldout_grid.png'), features, lrs, grid, chosen,
                  f'held-out top-1 after epoch {selection["epoch"]} (chosen: red)')
    return grid_text(features, lrs, grid, chosen)
