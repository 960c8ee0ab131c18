"""Figures of the curves and of the sweep report (matplotlib, Agg backend: files only, no display)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_curves", "plot_report"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_y(ax: Any) -> None:
    """A log y axis labelled with plain numbers; minor ticks labelled too when the data span less than about two
    decades."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def plot_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike, *, metric: str,
                title: str = "", target: float | None = None) -> Path:
    """Metric vs training kimg, one line per run (log y when all values are positive), as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = []
    for name, points in curves.items():
        if not points:
            continue
        kimg, vals = zip(*sorted(points))
        values += vals
        ax.plot(kimg, vals, marker="o", markersize=3, label=name)
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.4g}")
    if values and min(values) > 0:
        _log_y(ax)
    ax.set_xlabel("training images (kimg)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Seed-mean metric vs kimg, one line per row, ±1 std shaded, log y: one panel per table and variant."""
    plt = _pyplot()
    panels = [(t, v) for t in report["tables"] for v in t["variants"]]
    ncols = min(2, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 4.6 * nrows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (table, variant) in zip(axes.flat, panels):
        positive = _plot_rows(ax, variant, table["baseline"], cmap)
        if variant["target"] is not None:
            ax.axhline(variant["target"]["target"], color="gray", linestyle=":", linewidth=1,
                       label=f"target {variant['target']['target']:.4g}")
        if positive:
            _log_y(ax)
        ax.set_xlabel("training images (kimg)")
        ax.set_ylabel(variant["metric"])
        ax.set_title(f"{table['title']}" + (f" — {variant['label']}" if variant["label"] else "")
                     + f" ({variant['settings'].get('num_samples')} samples per point)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_rows(ax: Any, variant: Mapping[str, Any], baseline: str | None, cmap: Any) -> bool:
    """One line per row of a report variant (±1 std band over seeds); whether every plotted mean is positive.

    Rows that differ only in a ``key=value`` part of their label (``laplace`` and ``laplace/train.sigma_draw=
    stratified``) share a colour and differ in line style, so each setting's effect reads as a pair of lines."""
    positive = True
    bases: dict[str, int] = {}
    suffixes: dict[str, int] = {"": 0}
    for lab, r in variant["rows"].items():
        if not r["mean_curve"]:
            continue
        parts = lab.split("/")
        base = "/".join(q for q in parts if "=" not in q)
        suffix = "/".join(q for q in parts if "=" in q)
        kimg = np.array([k for k, _ in r["mean_curve"]])
        mean = np.array([r["cells"][k]["mean"] for k in kimg])
        std = np.array([r["cells"][k]["std"] or 0.0 for k in kimg])
        n = max(r["cells"][k]["n"] for k in kimg)
        i = bases.setdefault(base, len(bases))
        j = suffixes.setdefault(suffix, len(suffixes))
        color = cmap(i % 10)
        style = ("-", "--", ":", "-.")[(j + i // 10) % 4]
        name = f"{lab} (n={n})" + (" — baseline" if lab == baseline else "")
        ax.plot(kimg, mean, style, marker="o", markersize=3, color=color, label=name)
        if n > 1:
            lo = mean - std
            ax.fill_between(kimg, np.where(lo > 0, lo, mean * 0.5), mean + std, color=color, alpha=0.15,
                            linewidth=0)
        positive = positive and bool((mean > 0).all())
    return positive
