"""What activation statistics say, per layer: a summary table and a firing-frequency heatmap.

For every unit group, in layer order (double blocks img then txt, then single blocks): its width,
the positions seen, how many units never fired, and firing-frequency quantiles (min, 1%, 10%, 50%,
90%, max). The heatmap has one row per unit group and, along x, the group's units sorted by firing
frequency (binned to at most ``columns`` columns, so groups of different widths line up by share of
width); colour is the firing frequency.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from .stats import ActivationStats

QUANTILES = (("min", 0.0), ("1%", 0.01), ("10%", 0.10), ("50%", 0.50), ("90%", 0.90), ("max", 1.0))


def _key(unit: str) -> tuple[int, int, int]:
    """FLUX.1/FLUX.2 names: (double or single, block, stream) — for statistics that predate ``unit_layers``."""
    parts = unit.split(".")
    if parts[0] == "double_blocks":
        return 0, int(parts[1]), 0 if parts[2] == "img" else 1
    return 1, int(parts[1]), 0


def _layers(stats: ActivationStats) -> dict[str, tuple[int, str]]:
    """unit -> (layer index, stream): as the family's layer list said when the statistics were made,
    else from FLUX block names."""
    known = stats.meta.get("unit_layers")
    if isinstance(known, dict) and all(u in known for u in stats.units):
        return {u: (int(known[u][0]), str(known[u][1])) for u in stats.units}
    depth = _depth(stats)
    return {u: (layer_index(u, depth), u.split(".")[2] if u.startswith("double_blocks.") else "single")
            for u in stats.units}


def ordered_units(stats: ActivationStats) -> list[str]:
    """The unit groups of ``stats`` in layer order."""
    layers = _layers(stats)
    order = {u: i for i, u in enumerate(stats.units)}
    return sorted(stats.units, key=lambda u: (layers[u][0], order[u]))


def _depth(stats: ActivationStats) -> int:
    depth = stats.meta.get("depth")
    if isinstance(depth, int):
        return depth
    doubles = [_key(u)[1] for u in stats.units if u.startswith("double_blocks.")]
    return max(doubles) + 1 if doubles else 0


def layer_index(unit: str, depth: int) -> int:
    kind, idx, _ = _key(unit)
    return idx if kind == 0 else depth + idx


def frequency_quantiles(freq: torch.Tensor) -> dict[str, float]:
    f = freq.double().flatten()
    if f.numel() == 0:
        return {name: float("nan") for name, _ in QUANTILES}
    q = torch.quantile(f, torch.tensor([v for _, v in QUANTILES], dtype=torch.float64))
    return {name: float(v) for (name, _), v in zip(QUANTILES, q)}


def summary(stats: ActivationStats) -> list[dict]:
    """One row per unit group: layer, unit, stream, width, positions, never (units that never fired), and
    the firing-frequency quantiles (NaN for a group that saw no positions)."""
    layers = _layers(stats)
    rows = []
    for u in ordered_units(stats):
        count = stats.count[u]
        seen = stats.positions[u] > 0
        q = frequency_quantiles(stats.frequency(u)) if seen else {n: float("nan") for n, _ in QUANTILES}
        rows.append({"layer": layers[u][0], "unit": u, "stream": layers[u][1],
                     "width": count.numel(), "positions": stats.positions[u], "never": int((count == 0).sum()), **q})
    return rows


def totals(stats: ActivationStats) -> dict:
    rows = summary(stats)
    width = sum(r["width"] for r in rows)
    never = sum(r["never"] for r in rows)
    return {"unit_groups": len(rows), "units": width, "never": never, "never_share": never / width if width else 0.0,
            "positions": sum(r["positions"] for r in rows)}


def table(stats: ActivationStats, title: str | None = None):
    """The per-layer summary as a :class:`rich.table.Table`."""
    from rich.table import Table

    t = Table(title=title)
    for name, justify in (("layer", "right"), ("unit", "left"), ("width", "right"), ("positions", "right"),
                          ("never", "right")):
        t.add_column(name, justify=justify)
    for name, _ in QUANTILES:
        t.add_column(name, justify="right")
    for r in summary(stats):
        t.add_row(str(r["layer"]), r["unit"], f"{r['width']:,}", f"{r['positions']:,}", f"{r['never']:,}",
                  *("-" if r[n] != r[n] else f"{r[n]:.3f}" for n, _ in QUANTILES))
    return t


def heatmap_matrix(stats: ActivationStats, columns: int = 256) -> tuple[torch.Tensor, list[str]]:
    """(rows × cols float64 matrix of firing frequencies, row labels): each unit group's units sorted by
    frequency, averaged into ``cols = min(columns, widest group)`` equal shares of its width (a group
    narrower than ``cols`` repeats its units). Rows of groups that saw no positions are NaN."""
    units = ordered_units(stats)
    cols = max(1, min(columns, max((stats.count[u].numel() for u in units), default=1)))
    out = torch.full((len(units), cols), float("nan"), dtype=torch.float64)
    for i, u in enumerate(units):
        w = stats.count[u].numel()
        if stats.positions[u] <= 0 or w == 0:
            continue
        f = torch.sort(stats.frequency(u)).values
        if w >= cols:  # mean over equal shares of the sorted units
            bins = torch.arange(w) * cols // w
            out[i] = torch.zeros(cols, dtype=torch.float64).index_add_(0, bins, f) / torch.bincount(bins, minlength=cols)
        else:  # nearest unit for each column
            out[i] = f[((torch.arange(cols) * 2 + 1) * w) // (2 * cols)]
    return out, units


def heatmap_png(stats: ActivationStats, *, columns: int = 256, title: str | None = None, dpi: int = 110) -> bytes:
    """The firing-frequency heatmap as PNG bytes (matplotlib, Agg canvas; no global pyplot state)."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m, labels = heatmap_matrix(stats, columns)
    rows = len(labels)
    fig = Figure(figsize=(10, min(40.0, max(3.2, 1.6 + 0.16 * rows))), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")  # grey: a group that saw no positions
    data = np.ma.masked_invalid(m.numpy())
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0.0, vmax=1.0,
                   extent=(0.0, 1.0, rows - 0.5, -0.5))
    ax.set_yticks(range(rows), labels, fontsize=7 if rows <= 40 else 5)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0%", "25%", "50%", "75%", "100%"])
    ax.set_xlabel("units of the group, sorted by firing frequency (share of width)")
    if title is None:
        t = totals(stats)
        title = (f"{stats.meta.get('model', 'model')} {stats.fingerprint}: {stats.meta.get('prompts', '?')} prompts, "
                 f"{t['units']:,} units, {t['never']:,} never fired")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="firing frequency", shrink=0.8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def write_heatmap(stats: ActivationStats, path: str | os.PathLike, **kw) -> Path:
    """Render the heatmap and write it atomically to ``path``."""
    from ..outputs import atomic_write_bytes

    p = Path(path)
    atomic_write_bytes(p, heatmap_png(stats, **kw))
    return p
