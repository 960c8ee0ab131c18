"""The schedules report: every training noise schedule's density over logSNR and over ln σ, and how much mass each
puts near λ = 0.

``write_schedule_report(out_dir)`` writes

- ``schedules.png`` — two panels: p(λ) per unit logSNR λ = −2·ln σ, and p(u) per unit u = ln σ (p_λ(λ) = ½·p_u(−λ/2)),
  with the support of the training draws (``schedule.sigma_range``, dotted, outside shaded) and the data crossover
  σ = σ_data (dash-dotted) marked;
- ``schedules.md``  — a table with, for each schedule, P(|λ| < 1), P(|λ| < 2), P(|λ| < 4) computed from its CDF as
  F(a/2) − F(−a/2) in ln σ, the λ range holding the central 98% (icdf at 1% and 99%), the median σ, the support and
  the mass the truncation removed (F(a⁻) + 1 − F(b) of the untruncated distribution).

By default it shows every option in ``configs/schedule/`` with its own settings (built with ``img_resolution`` for the
resolution-dependent ``cosine_shifted``); options that cannot be built stand-alone are listed as skipped.
``snr_reference`` draws them in the ``unit`` (λ = −2 ln σ, as published) or the ``data`` (λ = 2 ln(σ_data/σ))
convention, or ``both`` (data dashed, for the schedules the convention moves). The axes are always λ = −2 ln σ and
ln σ, so the two conventions can be compared. ``evaluate.py report=schedules`` calls it; ``docs/figures/`` holds a
copy for the README.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from configs import to_plain_dict
from diffusion.schedules import SNR_REFERENCES, build_schedule
from diffusion.schedules.base import NoiseSchedule

SCHEDULE_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "schedule"
MASS_LEVELS = (1.0, 2.0, 4.0)
FIGURE_CONVENTIONS = (*SNR_REFERENCES, "both")


def default_schedule_configs(config_dir: Path = SCHEDULE_CONFIG_DIR) -> dict[str, Any]:
    """Every option of the ``schedule`` config group, keyed by file name."""
    return {p.stem: OmegaConf.load(p) for p in sorted(config_dir.glob("*.yaml"))}


def logsnr_mass(schedule: NoiseSchedule, a: float) -> float:
    """P(|λ| < a) = F(a/2) − F(−a/2) in u = ln σ, from the schedule's CDF."""
    bounds = torch.tensor([-0.5 * a, 0.5 * a], dtype=torch.float64)
    lo, hi = schedule.cdf(bounds).tolist()
    return hi - lo


def _with_convention(cfgs: Mapping[str, Any], snr_reference: str) -> dict[str, dict[str, Any]]:
    """The configs to draw: as given for ``unit``; in the data convention for ``data``; both (``<label> (data)``
    added for the schedules it moves) for ``both``."""
    if snr_reference not in FIGURE_CONVENTIONS:
        raise ValueError(f"snr_reference must be one of {', '.join(FIGURE_CONVENTIONS)}, got {snr_reference!r}")
    out: dict[str, dict[str, Any]] = {}
    for label, cfg in cfgs.items():
        plain = to_plain_dict(cfg)
        if snr_reference != "data":
            out[label] = plain
        if snr_reference != "unit" and plain.get("name") != "infonoise":
            out[label + (" (data)" if snr_reference == "both" else "")] = {**plain, "snr_reference": "data"}
    return out


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
        if label.endswith(" (data)") and not schedule.logsnr_parameterised:
            continue  # stated in σ: the same curve as its unit row
        built[label] = schedule
    return built, skipped


def _support_text(schedule: NoiseSchedule) -> str:
    if not schedule.truncated:
        return "untruncated"
    lo, hi = schedule.sigma_min, schedule.sigma_max
    return f"[{0 if lo is None else lo:g}, {'∞' if hi is None else format(hi, 'g')}]"


def _draw_marks(axes: tuple[Any, Any], schedules: Mapping[str, NoiseSchedule], sigma_data: float) -> None:
    """The support bounds of the draws (dotted, outside shaded) and the crossover σ = σ_data, in both panels."""
    ax_l, ax_u = axes
    bounds = sorted({b for s in schedules.values() if s.truncated for b in (s.sigma_min, s.sigma_max) if b})
    for i, b in enumerate(bounds):
        kw = {"color": "0.35", "linestyle": ":", "linewidth": 1.0, "label": "sigma_range bounds" if i == 0 else None}
        ax_l.axvline(-2.0 * math.log(b), **kw)
        ax_u.axvline(math.log(b), **kw)
    if len(bounds) == 2:
        lo, hi = math.log(bounds[0]), math.log(bounds[1])
        for ax, (a, b) in ((ax_u, (lo, hi)), (ax_l, (-2 * hi, -2 * lo))):
            ax.axvspan(ax.get_xlim()[0], a, color="0.9", zorder=0)
            ax.axvspan(b, ax.get_xlim()[1], color="0.9", zorder=0)
    kw = {"color": "0.2", "linestyle": "-.", "linewidth": 1.0, "label": f"σ = σ_data = {sigma_data:g}"}
    ax_l.axvline(-2.0 * math.log(sigma_data), **kw)
    ax_u.axvline(math.log(sigma_data), **kw)


def _plot(schedules: Mapping[str, NoiseSchedule], sigma_data: float, png: Path) -> list[tuple]:
    """Draw the figure into ``png``; returns the table rows."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    lam = torch.linspace(-16.0, 16.0, 8001, dtype=torch.float64)
    u = torch.linspace(-8.0, 8.0, 8001, dtype=torch.float64)
    fig, (ax_l, ax_u) = plt.subplots(1, 2, figsize=(15, 5.5))
    cmap = plt.get_cmap("tab20")
    colors: dict[str, Any] = {}
    rows = []
    for label, sched in schedules.items():
        base = label.removesuffix(" (data)")
        color = colors.setdefault(base, cmap(len(colors) % 20))
        with torch.no_grad():
            p_lam, p_u = 0.5 * sched.density(-0.5 * lam), sched.density(u)
        kw = {"color": color, "linestyle": "--" if label.endswith(" (data)") else "-", "linewidth": 1.4}
        ax_l.plot(lam.numpy(), p_lam.numpy(), label=label, **kw)
        ax_u.plot(u.numpy(), p_u.numpy(), label=label, **kw)
        masses = [logsnr_mass(sched, a) for a in MASS_LEVELS]
        q = sched.icdf(torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64))
        rows.append((label, repr(sched), masses, (-2.0 * q[2]).item(), (-2.0 * q[0]).item(), math.exp(q[1].item()),
                     _support_text(sched), sched.truncated_mass()))
    ax_l.set(xlabel="logSNR λ = −2 ln σ", ylabel="density per unit λ", title="Training noise distributions over logSNR")
    ax_u.set(xlabel="ln σ", ylabel="density per unit ln σ", title="… and over ln σ (EDM's x = y + σ·n)")
    for ax in (ax_l, ax_u):
        ax.set_ylim(bottom=0)
        ax.margins(x=0)
        ax.grid(alpha=0.3)
    _draw_marks((ax_l, ax_u), schedules, sigma_data)
    ax_u.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return rows


def write_schedule_report(out_dir: str | Path, schedule_cfgs: Mapping[str, Any] | None = None,
                          img_resolution: int = 32, sigma_data: float = 0.5,
                          snr_reference: str = "unit") -> dict[str, Path]:
    """Write ``schedules.png`` and ``schedules.md`` to ``out_dir``; returns their paths.

    ``schedule_cfgs`` maps a label to a schedule config (``{'name': 'laplace', 'b': 0.5, ...}``); None = every file
    in ``configs/schedule/``. ``img_resolution`` and ``sigma_data`` are the context the schedules are built with;
    ``snr_reference``: unit, data or both (module docstring).
    """
    from diffusion.weighting import EDMWeighting

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = _with_convention(default_schedule_configs() if schedule_cfgs is None else dict(schedule_cfgs),
                            snr_reference)
    context = {"img_resolution": img_resolution, "sigma_data": sigma_data, "weighting": EDMWeighting(sigma_data),
               "total_nimg": 1_000_000, "batch_size": 512}  # what an adaptive schedule needs to be built
    schedules, skipped = _build_all(cfgs, context)
    png = out / "schedules.png"
    rows = _plot(schedules, sigma_data, png)
    convention = {"unit": "as published: λ = −2·ln σ, no σ_data folded in (the logSNR of the equivalent VP process "
                          "on unit-variance data)",
                  "data": f"the data convention λ = 2·ln(σ_data/σ), σ_data = {sigma_data:g}",
                  "both": f"both: as published (solid) and in the data convention λ = 2·ln(σ_data/σ), σ_data = "
                          f"{sigma_data:g} (dashed, rows '(data)')"}[snr_reference]
    lines = [
        "# Training noise schedules",
        "",
        "Every schedule is a probability density over the noise level (Hang et al. 2024). Conventions: "
        f"{convention}; the axes are λ = −2·ln σ and ln σ in EDM's x = y + σ·n. Each schedule is drawn with its "
        "config's support (`schedule.sigma_range`: conditioned on σ in that range, dotted lines; 'cut' is the mass "
        "the truncation removed). Masses are computed from each schedule's CDF. Resolution-dependent schedules use "
        f"img_resolution = {img_resolution}.",
        "",
        f"![schedule densities]({png.name})",
        "",
        "| schedule | definition | P(\\|λ\\| < 1) | P(\\|λ\\| < 2) | P(\\|λ\\| < 4) | λ at t = 0.99 … 0.01 "
        "| median σ | support | cut |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, definition, masses, lam_lo, lam_hi, med, support, cut in rows:
        m = " | ".join(f"{v:.4f}" for v in masses)
        lines.append(f"| {label} | `{definition}` | {m} | {lam_lo:.2f} … {lam_hi:.2f} | {med:.4g} | {support} "
                     f"| {cut:.3g} |")
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
    parser.add_argument("--snr-reference", choices=FIGURE_CONVENTIONS, default="unit")
    args = parser.parse_args()
    paths = write_schedule_report(args.out_dir, img_resolution=args.img_resolution, snr_reference=args.snr_reference)
    print("\n".join(str(p) for p in paths.values()))
