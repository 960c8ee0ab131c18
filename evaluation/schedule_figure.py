"""The schedules report: every training noise schedule's density over logSNR and over ln σ, and how much mass each
puts near λ = 0.

``write_schedule_report(out_dir)`` writes

- ``schedules.png`` — two panels: p(λ) per unit logSNR λ = −2·ln σ, and p(u) per unit u = ln σ (p_λ(λ) = ½·p_u(−λ/2));
- ``schedules.md``  — a table with, for each schedule, P(|λ| < 1), P(|λ| < 2), P(|λ| < 4) computed from its CDF as
  F(a/2) − F(−a/2) in ln σ, the λ range holding the central 98% (icdf at 1% and 99%) and the median σ.

By default it shows every option in ``configs/schedule/`` (built with ``img_resolution`` for the resolution-dependent
``cosine_shifted``); options that cannot be built stand-alone are listed as skipped. ``evaluate.py report=schedules``
calls it; ``docs/figures/`` holds a copy for the README.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from diffusion.schedules import build_schedule
from diffusion.schedules.base import NoiseSchedule

SCHEDULE_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "schedule"
MASS_LEVELS = (1.0, 2.0, 4.0)


def default_schedule_configs(config_dir: Path = SCHEDULE_CONFIG_DIR) -> dict[str, Any]:
    """Every option of the ``schedule`` config group, keyed by file name."""
    return {p.stem: OmegaConf.load(p) for p in sorted(config_dir.glob("*.yaml"))}


def logsnr_mass(schedule: NoiseSchedule, a: float) -> float:
    """P(|λ| < a) = F(a/2) − F(−a/2) in u = ln σ, from the schedule's CDF."""
    bounds = torch.tensor([-0.5 * a, 0.5 * a], dtype=torch.float64)
    lo, hi = schedule.cdf(bounds).tolist()
    return hi - lo


def _build_all(schedule_cfgs: Mapping[str, Any], context: dict[str, Any]) -> tuple[dict[str, NoiseSchedule],
                                                                                     dict[str, str]]:
    built, skipped = {}, {}
    for label, cfg in schedule_cfgs.items():
        try:
            schedule = build_schedule(cfg, **context)
        except Exception as exc:  # noqa: BLE001 — a report lists what it could not draw instead of failing
            skipped[label] = f"{type(exc).__name__}: {exc}"
            continue
        if type(schedule).on_step is not NoiseSchedule.on_step:
            skipped[label] = ("adaptive: its density is learned during training (plot a run's profile with "
                              "`python -m evaluation.infonoise_report <run_dir>`)")
            continue
        built[label] = schedule
    return built, skipped


def write_schedule_report(out_dir: str | Path, schedule_cfgs: Mapping[str, Any] | None = None,
                          img_resolution: int = 32, sigma_data: float = 0.5) -> dict[str, Path]:
    """Write ``schedules.png`` and ``schedules.md`` to ``out_dir``; returns their paths.

    ``schedule_cfgs`` maps a label to a schedule config (``{'name': 'laplace', 'b': 0.5, ...}``); None = every file
    in ``configs/schedule/``. ``img_resolution`` and ``sigma_data`` are the context the schedules are built with.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from diffusion.weighting import EDMWeighting

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = default_schedule_configs() if schedule_cfgs is None else dict(schedule_cfgs)
    context = {"img_resolution": img_resolution, "sigma_data": sigma_data, "weighting": EDMWeighting(sigma_data),
               "total_nimg": 1_000_000, "batch_size": 512}  # what an adaptive schedule needs to be built
    schedules, skipped = _build_all(cfgs, context)

    lam = torch.linspace(-16.0, 16.0, 8001, dtype=torch.float64)
    u = torch.linspace(-8.0, 8.0, 8001, dtype=torch.float64)
    fig, (ax_l, ax_u) = plt.subplots(1, 2, figsize=(15, 5.5))
    cmap = plt.get_cmap("tab20")
    styles = ["-", "--", "-.", ":"]
    rows = []
    for i, (label, sched) in enumerate(schedules.items()):
        with torch.no_grad():
            p_lam = 0.5 * sched.density(-0.5 * lam)
            p_u = sched.density(u)
        kw = {"color": cmap(i % 20), "linestyle": styles[(i // 10) % len(styles)], "linewidth": 1.4}
        ax_l.plot(lam.numpy(), p_lam.numpy(), label=label, **kw)
        ax_u.plot(u.numpy(), p_u.numpy(), label=label, **kw)
        masses = [logsnr_mass(sched, a) for a in MASS_LEVELS]
        q = sched.icdf(torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64))
        lam_hi, lam_lo = (-2.0 * q[0]).item(), (-2.0 * q[2]).item()
        rows.append((label, repr(sched), masses, lam_lo, lam_hi, math.exp(q[1].item())))

    ax_l.set_xlabel("logSNR λ = −2 ln σ")
    ax_l.set_ylabel("density per unit λ")
    ax_l.set_title("Training noise distributions over logSNR")
    ax_u.set_xlabel("ln σ")
    ax_u.set_ylabel("density per unit ln σ")
    ax_u.set_title("… and over ln σ (EDM's x = y + σ·n)")
    for ax in (ax_l, ax_u):
        ax.set_ylim(bottom=0)
        ax.margins(x=0)
        ax.grid(alpha=0.3)
    ax_u.legend(fontsize=8, ncol=2, loc="upper right")
    fig.tight_layout()
    png = out / "schedules.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)

    lines = [
        "# Training noise schedules",
        "",
        "Every schedule is a probability density over the noise level (Hang et al. 2024). logSNR λ = −2·ln σ in EDM's",
        "x = y + σ·n (no σ_data folded in; the logSNR of the equivalent VP process). Masses are computed from each",
        f"schedule's CDF. Resolution-dependent schedules use img_resolution = {img_resolution}.",
        "",
        f"![schedule densities]({png.name})",
        "",
        "| schedule | definition | P(\\|λ\\| < 1) | P(\\|λ\\| < 2) | P(\\|λ\\| < 4) | λ at t = 0.99 … 0.01 "
        "| median σ |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, definition, masses, lam_lo, lam_hi, med in rows:
        m = " | ".join(f"{v:.4f}" for v in masses)
        lines.append(f"| {label} | `{definition}` | {m} | {lam_lo:.2f} … {lam_hi:.2f} | {med:.4g} |")
    if skipped:
        lines += ["", "Not drawn:", ""]
        lines += [f"- `{label}`: {reason}" for label, reason in skipped.items()]
    md = out / "schedules.md"
    md.write_text("\n".join(lines) + "\n")
    return {"png": png, "md": md}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="docs/figures")
    parser.add_argument("--img-resolution", type=int, default=32)
    args = parser.parse_args()
    paths = write_schedule_report(args.out_dir, img_resolution=args.img_resolution)
    print("\n".join(str(p) for p in paths.values()))
