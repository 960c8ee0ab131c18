"""Plots of an InfoNoise run: the learned profile and the training density over training, against the base schedule.

    python -m evaluation.infonoise_report <run_dir> [out.png]

Sources, both optional (at least one must exist):
- ``<run_dir>/metrics.jsonl``: the records the training loop writes at every refresh, keys ``schedule/<stat>`` next to
  ``kimg`` and ``step`` (stats of ``InfoNoise.refresh``: ``pi_q05 … pi_q95`` in σ, ``gate_c``, ``area``,
  ``area_per_dim``, ``max_dcdf``, ``empty_frac``, ``warmup``);
- ``<run_dir>/checkpoints/checkpoint-*.pt``: the rank-0 InfoNoise state (``state["schedule"][0]``), from which the
  full profile is recomputed (``InfoNoise.profile``).

Panels: (a) quantiles of π in σ over kimg, with the base schedule's quantiles and the gate pivot; (b) the area
Σ rate·Δ per dimension (the likelihood-bound proxy) and max|ΔCDF| per refresh; (c) the rate m̂/σ² per ln σ at each
checkpoint (dashed where a bin was never measured), with the gated rate of the last; (d) the training density π per
ln σ at each checkpoint against the base schedule on the same grid (and EDM's ρ = 7 step density, for reference).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from diffusion.run_state import infonoise_from_run_state
from diffusion.schedules import build_schedule
from diffusion.schedules.infonoise import PI_QUANTILES, InfoNoise
from training.checkpoint import list_checkpoints, load_checkpoint

_PREFIX = "schedule/"


def read_schedule_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The refresh records of ``metrics.jsonl`` (those with ``schedule/*`` keys), prefix stripped, with kimg/step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            stats = {k[len(_PREFIX):]: v for k, v in rec.items() if k.startswith(_PREFIX)}
            if stats:
                stats["kimg"] = float(rec.get("kimg", math.nan))
                stats["step"] = float(rec.get("step", math.nan))
                out.append(stats)
    return out


def _pick(items: list[Any], count: int) -> list[Any]:
    if len(items) <= count:
        return items
    idx = sorted({round(i * (len(items) - 1) / (count - 1)) for i in range(count)})
    return [items[i] for i in idx]


def load_profiles(run_dir: str | os.PathLike, max_checkpoints: int = 6) -> list[tuple[float, InfoNoise, float]]:
    """(kimg, InfoNoise, kimg at the end of its warm-up) for up to ``max_checkpoints`` checkpoints of the run, evenly
    spread, the newest included."""
    out = []
    for path in _pick(list_checkpoints(run_dir), max_checkpoints):
        state = load_checkpoint(path)
        sch = infonoise_from_run_state(state)
        # the table takes over at the first refresh at or after warmup_steps
        warm_steps = math.ceil(int(sch.warmup_steps) / sch.refresh_every) * sch.refresh_every
        warm_kimg = warm_steps * int(state["config"]["train"]["batch"]) / 1000.0
        out.append((state["progress"]["cur_nimg"] / 1000.0, sch, warm_kimg))
    return out


def plot_infonoise_profile(run_dir: str | os.PathLike, out_png: str | os.PathLike | None = None,
                           max_checkpoints: int = 6) -> Path:
    """Write the InfoNoise report figure of ``run_dir`` to ``out_png`` (default ``<run_dir>/infonoise_profile.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out_png = Path(out_png) if out_png is not None else run_dir / "infonoise_profile.png"
    metrics = read_schedule_metrics(run_dir)
    profiles = load_profiles(run_dir, max_checkpoints)
    if not metrics and not profiles:
        raise FileNotFoundError(f"{run_dir}: no InfoNoise records in metrics.jsonl and no checkpoints; was it trained "
                                "with schedule=infonoise?")
    base = profiles[-1][1].base if profiles else _base_from_config(run_dir)

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax_q, ax_area, ax_rate, ax_pi = axes.flat
    _plot_quantiles(ax_q, metrics, profiles, base)
    _plot_area(ax_area, metrics)
    _plot_profiles(ax_rate, ax_pi, profiles, plt.get_cmap("viridis"))
    fig.suptitle(f"InfoNoise: {run_dir.name}")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def _plot_quantiles(ax_q: Any, metrics: list[dict[str, float]], profiles: list[tuple[float, InfoNoise, float]],
                    base: Any) -> None:
    """(a) quantiles of π over training, the gate pivot, the end of the warm-up and the base schedule's quantiles."""
    if metrics:
        kimg = [m["kimg"] for m in metrics]
        q = {p: [m.get(f"pi_q{round(p * 100):02d}", math.nan) for m in metrics] for p in PI_QUANTILES}
        ax_q.fill_between(kimg, q[0.05], q[0.95], alpha=0.2, color="C0", label="π 5–95%")
        ax_q.fill_between(kimg, q[0.25], q[0.75], alpha=0.35, color="C0", label="π 25–75%")
        ax_q.plot(kimg, q[0.5], color="C0", label="π median")
        gate = [m.get("gate_c", math.nan) for m in metrics]
        if any(math.isfinite(g) for g in gate):
            ax_q.plot(kimg, gate, color="C3", ls=":", label="gate pivot c")
    if profiles:
        ax_q.axvline(profiles[-1][2], color="0.5", lw=0.8, label="end of warm-up (base → π)")
    if base is not None:
        with torch.no_grad():
            bq = base.icdf(torch.tensor(PI_QUANTILES, dtype=torch.float64)).exp().tolist()
        for i, v in enumerate(bq):
            ax_q.axhline(v, color="k", ls="--", lw=0.8, label="base quantiles" if i == 0 else None)
    ax_q.set_yscale("log")
    ax_q.set_xlabel("kimg")
    ax_q.set_ylabel("σ")
    ax_q.set_title("(a) training density π: quantiles in σ")
    ax_q.legend(fontsize=7, loc="best")


def _plot_area(ax_area: Any, metrics: list[dict[str, float]]) -> None:
    """(b) the area Σ rate·Δ (the likelihood-bound proxy) and max|ΔCDF| per refresh."""
    if metrics:
        kimg = [m["kimg"] for m in metrics]
        per_dim = all("area_per_dim" in m for m in metrics)
        area = [m.get("area_per_dim" if per_dim else "area", math.nan) for m in metrics]
        ax_area.plot(kimg, area, color="C2", label="area Σ rate·Δ" + (" per dim" if per_dim else " (per sample)"))
        ax_area.set_ylabel("nats" + (" / dim" if per_dim else " / sample"))
        ax2 = ax_area.twinx()
        dcdf = [m.get("max_dcdf", math.nan) for m in metrics]
        ax2.plot(kimg, dcdf, color="C1", lw=0.8, label="max|ΔCDF| per refresh")
        ax2.set_yscale("log")
        ax2.axhline(1e-2, color="C1", ls=":", lw=0.8)
        ax2.set_ylabel("max|ΔCDF|")
        lines = ax_area.get_lines() + ax2.get_lines()[:1]
        ax_area.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="best")
    ax_area.set_xlabel("kimg")
    ax_area.set_title("(b) likelihood-bound proxy and table change")


def _plot_profiles(ax_rate: Any, ax_pi: Any, profiles: list[tuple[float, InfoNoise, float]], cmap: Any) -> None:
    """(c) the rate per ln σ and (d) the training density π per ln σ at each checkpoint, against the base schedule
    and EDM's ρ = 7 step density."""
    for i, (kimg_ck, sch, _) in enumerate(profiles):
        prof = {k: v.detach().cpu() for k, v in sch.profile().items()}
        color = cmap(i / max(1, len(profiles) - 1))
        sig = prof["centers"].numpy()
        seen = prof["seen"].numpy()
        if seen.any():
            rate = prof["rate"].numpy()
            # bins never measured (filled by interpolation/extrapolation) are drawn thin and dashed
            ax_rate.plot(sig, rate, color=color, lw=0.6, ls="--")
            ax_rate.plot(sig, np.where(seen, rate, np.nan), color=color, label=f"{kimg_ck:g} kimg")
        ax_pi.plot(sig, prof["pi"].numpy(), color=color, drawstyle="steps-mid", label=f"{kimg_ck:g} kimg")
        if i == len(profiles) - 1 and seen.any():
            ax_rate.plot(sig, (prof["rate"] * prof["gate"]).numpy(), color="C3", ls=":", label="gated (last)")
    if profiles:
        sch = profiles[-1][1]
        sig = sch.centers.cpu().numpy()
        base_pi = (sch.base_grid_mass / sch.delta).cpu().numpy()
        ax_pi.plot(sig, base_pi, color="k", ls="--", label=f"base ({type(sch.base).__name__}) on grid")
        edm = (sch.edm_step_masses(7.0) / sch.delta).cpu().numpy()
        ax_pi.plot(sig, edm, color="0.5", ls=":", label="EDM ρ=7 step density")
    for ax, title, ylabel in ((ax_rate, "(c) rate m̂/σ² per ln σ", "nats per unit ln σ"),
                              (ax_pi, "(d) training density π per ln σ", "density per unit ln σ")):
        ax.set_xscale("log")
        ax.set_xlabel("σ")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if ax.get_lines():
            ax.legend(fontsize=7, loc="best")
    ax_rate.set_yscale("log")


def _base_from_config(run_dir: Path):
    """The base schedule named in the run's config.yaml (None if it cannot be read)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    base_cfg = OmegaConf.load(path).get("schedule", {}).get("base")
    return None if base_cfg is None else build_schedule(base_cfg)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not 1 <= len(argv) <= 2:
        raise SystemExit("usage: python -m evaluation.infonoise_report <run_dir> [out.png]")
    out = plot_infonoise_profile(argv[0], argv[1] if len(argv) > 1 else None)
    print(out)


if __name__ == "__main__":
    main()
