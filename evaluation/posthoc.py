"""Post-hoc EMA in evaluation (Karras et al. 2024, EDM2, arXiv 2312.02696, Sec. 3): evaluate a run at any EMA length,
and sweep the EMA length. The reconstruction itself is ``training.posthoc_ema``.

    python evaluate.py ckpt=<run> ema.sigma_rel=0.08 [ema.at_kimg=...]            # one post-hoc EMA, like ema=true
    python evaluate.py ema_sweep=<run or sweep dir> ema.sigma_rels=[0.04,0.06,0.08,0.10,0.13,0.16]
                       [ema.at_kimg=...] [eval.num_samples=...]                    # FID against σ_rel

The sweep reconstructs every σ_rel of ``ema.sigma_rels`` for every run at or below ``ema_sweep`` that has
``ema_snapshots/`` (trained with ``train.ema=power``), at the newest snapshot (or the newest at or before
``ema.at_kimg``), and evaluates it with the run's own data and sampler configs (changed on the command line as for
``ckpt=``). Each result is a line of ``<run>/ema_sweep.jsonl``, keyed by the evaluation settings and the snapshot
time, so a rerun evaluates only the σ_rels it has not seen. It writes ``<run>/ema_sweep.md`` (table: σ_rel, γ,
metric, the profile fit's relative residual; the best row marked) and ``<run>/ema_sweep.png`` (metric against σ_rel),
and for a directory with several runs ``<dir>/ema_sweep.md`` (each run's best σ_rel) and ``<dir>/ema_sweep.png``
(one line per run) — so each arm of a schedule comparison is compared at its own best EMA length.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from configs import jsonable
from data.atomic import atomic_write_text
from evaluation.curves import curve_settings, run_name, settings_key
from evaluation.protocol import evaluate_model, evaluate_plan, planned_evaluation
from evaluation.settings import primary_key, run_group
from evaluation.sweep import run_config
from training.checkpoint import load_denoiser
from training.denoiser import denoiser_from_geometry
from training.posthoc_ema import (
    SNAPSHOT_DIR,
    ema_choice,
    list_snapshots,
    load_posthoc_denoiser,
    reconstruct,
    sigma_rel_to_gamma,
)

__all__ = ["SWEEP_FILE", "check_ema_mode", "find_posthoc_runs", "load_eval_denoiser", "out_suffix", "run_ema_sweep"]

SWEEP_FILE = "ema_sweep.jsonl"
_RECONSTRUCT_BYTES = 4 * 2**30  # reconstruct at most this much float32 weights at once (σ_rels per pass)


def check_ema_mode(cfg: Any) -> None:
    """A post-hoc ``ema.sigma_rel`` only means something with ``ckpt=`` (``ema_sweep=`` takes ``ema.sigma_rels``)."""
    choice = ema_choice(cfg.get("ema"))
    if choice.posthoc and cfg.get("ckpt") is None:
        raise ValueError("ema.sigma_rel= reconstructs a post-hoc EMA of one run: use it with ckpt=<run>; for a "
                         "sweep over EMA lengths use ema_sweep=<run or sweep dir> ema.sigma_rels=[...]")


def out_suffix(cfg: Any) -> str:
    """``-phema<σ_rel>`` for the default output name of a post-hoc evaluation, else ''."""
    choice = ema_choice(cfg.get("ema"))
    return f"-phema{choice.sigma_rel:g}" if choice.posthoc else ""


def load_eval_denoiser(cfg: Any, path: str, device: Any) -> tuple[torch.nn.Module, Any, Any]:
    """``ckpt=``'s denoiser (``path``: the resolved checkpoint) by ``ema``: the raw weights, the checkpoint's EMA, or
    a post-hoc EMA (at the newest snapshot no later than the checkpoint, or at ``ema.at_kimg``); returns (denoiser,
    the run's config, what to record as ``ema``: a bool, or the post-hoc EMA's σ_rel, γ, time, snapshots and fit
    residual)."""
    choice = ema_choice(cfg.get("ema"))
    if not choice.posthoc:
        denoiser, run_cfg = load_denoiser(path, ema=choice.use_ema, device=device)
        return denoiser, run_cfg, choice.use_ema
    denoiser, run_cfg, info = load_posthoc_denoiser(path, choice.sigma_rel, choice.at_kimg, device=device)
    print(f"post-hoc EMA σ_rel={choice.sigma_rel:g} (γ={info['gamma']:.3f}) at {info['at_kimg']:g} kimg from "
          f"{info['num_snapshots']} snapshots (profile fit residual {info['fit_residual']:.2e})")
    return denoiser, run_cfg, {k: info[k] for k in ("sigma_rel", "gamma", "at_kimg", "num_snapshots",
                                                    "fit_residual")}


def find_posthoc_runs(root: str | os.PathLike) -> list[Path]:
    """The run directories at or below ``root`` that hold EMA snapshots."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise FileNotFoundError(f"ema_sweep: directory not found: {root}")
    runs = sorted({p.parent for p in root.rglob(SNAPSHOT_DIR) if p.is_dir() and list_snapshots(p)})
    if not runs:
        raise ValueError(f"ema_sweep: no run with EMA snapshots at or below {root}: train with train.ema=power "
                         f"(snapshots every train.ema_snapshot_kimg in <run>/{SNAPSHOT_DIR}/)")
    return runs


def read_sweep(run: Path, key: str | None = None) -> list[dict[str, Any]]:
    """The entries of ``<run>/ema_sweep.jsonl`` (those with settings key ``key``), by σ_rel."""
    path = run / SWEEP_FILE
    if not path.is_file():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted((e for e in entries if key is None or e["settings_key"] == key), key=lambda e: e["sigma_rel"])


def run_ema_sweep(cfg: Any, overrides: Sequence[str] = (), dist_info: Any = None) -> dict[str, Any]:
    """``ema_sweep=<run or sweep dir>``: evaluate ``ema.sigma_rels`` of every run (module docstring)."""
    choice = ema_choice(cfg.get("ema"))
    if not choice.sigma_rels:
        raise ValueError("ema_sweep needs the EMA lengths to try: ema.sigma_rels=[0.04,0.06,0.08,0.10,0.13,0.16] "
                         "(EDM2's relative standard deviation σ_rel, each in (0, 0.3003))")
    ctx = planned_evaluation(cfg, dist_info)
    settings = ctx.settings
    root = Path(os.path.expanduser(str(cfg.ema_sweep)))
    plan = [_plan_run(run, root, cfg, overrides, settings, choice, ctx.main) for run in find_posthoc_runs(root)]
    evaluate_plan(plan, ctx, lambda item, todo: f"[{item['name']}] {len(todo)} of {len(choice.sigma_rels)} EMA "
                  f"lengths to evaluate at {item['at_nimg'] / 1000:g} kimg (settings {item['key']})",
                  lambda item, todo, get_reference: _evaluate_run(item, todo, settings, get_reference,
                                                                 device=ctx.device, distributed=ctx.distributed,
                                                                 main=ctx.main))
    if not ctx.main:
        return {}
    return _summarise(plan, settings, root)


def _plan_run(run: Path, root: Path, cfg: Any, overrides: Sequence[str], settings: Mapping[str, Any], choice: Any,
              main: bool) -> dict[str, Any]:
    """One run's sweep (the same on every rank): its configs, snapshot time, settings key and σ_rels to do."""
    times = sorted({s.nimg for s in list_snapshots(run)})
    at = None if choice.at_kimg is None else int(round(choice.at_kimg * 1000))
    eligible = [t for t in times if at is None or t <= at]
    if not eligible:
        raise ValueError(f"ema_sweep: {run} has no EMA snapshot at or before ema.at_kimg={choice.at_kimg}")
    run_cfg = OmegaConf.create(run_config(run))
    data_cfg = run_group(run_cfg.get("data"), cfg.data, overrides, "data")
    sampler_cfg = run_group(run_cfg.get("sampler"), cfg.sampler, overrides, "sampler")
    sweep_settings = {**curve_settings(settings, data_cfg, sampler_cfg, True), "at_nimg": eligible[-1]}
    key = settings_key(sweep_settings)
    done = {round(e["sigma_rel"], 12) for e in read_sweep(run, key)} if main else set()
    todo = [s for s in choice.sigma_rels if round(s, 12) not in done]
    return {"run": run, "name": run_name(run, root), "data": data_cfg, "sampler": sampler_cfg, "at_nimg": eligible[-1],
            "settings": sweep_settings, "key": key, "todo": todo, "sigma_rels": list(choice.sigma_rels)}


def _evaluate_run(item: Mapping[str, Any], todo: Sequence[float], settings: Mapping[str, Any], get_reference: Any, *,
                  device: Any, distributed: bool, main: bool) -> None:
    """Reconstruct the σ_rels to do (a few per pass over the snapshots) and evaluate each (all ranks)."""
    if not todo:
        return
    newest = [s for s in list_snapshots(item["run"]) if s.nimg == item["at_nimg"]][0]
    size = sum(t.numel() * 4 for t in torch.load(newest.path, map_location="cpu", weights_only=True,
                                                   mmap=True)["params"].values())
    per_pass = max(1, min(len(todo), _RECONSTRUCT_BYTES // max(size, 1)))
    for lo in range(0, len(todo), per_pass):
        chunk = list(todo[lo:lo + per_pass])
        t0 = time.time()
        states, info = reconstruct(item["run"], chunk, item["at_nimg"])
        run_cfg = OmegaConf.create(info["config"])
        geometry = info["geometry"]
        for sigma_rel, state, residual in zip(chunk, states, info["fit_residual"]):
            denoiser = denoiser_from_geometry(run_cfg, geometry)
            denoiser.load_state_dict(state)
            denoiser = denoiser.eval().requires_grad_(False).to(device)
            result = evaluate_model(denoiser, item["data"], item["sampler"], settings, device=device,
                                    get_reference=get_reference, distributed=distributed)
            if main:
                _append(item, sigma_rel, residual, info, result, time.time() - t0)
            t0 = time.time()


def _append(item: Mapping[str, Any], sigma_rel: float, residual: float, info: Mapping[str, Any],
            result: Mapping[str, Any], seconds: float) -> None:
    entry = {"run": item["name"], "sigma_rel": sigma_rel, "gamma": sigma_rel_to_gamma(sigma_rel),
             "at_nimg": info["at_nimg"], "at_kimg": info["at_nimg"] / 1000, "settings_key": item["key"],
             "metrics": result["metrics"], "num_samples": result["num_samples"], "seeds": result["seeds"],
             "fit_residual": residual, "num_snapshots": info["num_snapshots"],
             "tracked_sigma_rels": info["tracked_sigma_rels"], "settings": item["settings"],
             "seconds": round(seconds, 2), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(item["run"] / SWEEP_FILE, "a") as f:
        f.write(json.dumps(jsonable(entry), allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    shown = ", ".join(f"{k} = {v:.4g}" for k, v in result["metrics"].items())
    print(f"[{item['name']}] σ_rel {sigma_rel:g}: {shown}", flush=True)


def _summarise(plan: Sequence[Mapping[str, Any]], settings: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """Per-run tables and plots, and (for several runs) the directory's summary; returns every number."""
    wanted = {item["name"]: {round(s, 12) for s in item["sigma_rels"]} for item in plan}
    entries = {item["name"]: [e for e in read_sweep(item["run"], item["key"])
                              if round(e["sigma_rel"], 12) in wanted[item["name"]]] for item in plan}
    metric = settings.get("curve_metric") or primary_key(
        dict.fromkeys([k for es in entries.values() for e in es for k in e["metrics"]], 0.0))[0]
    lower = primary_key({metric: 0.0})[1]
    summary: dict[str, Any] = {"metric": metric, "runs": {}}
    for item in plan:
        rows = [e for e in entries[item["name"]] if metric in e["metrics"]]
        best = (min if lower else max)(rows, key=lambda e: e["metrics"][metric]) if rows else None
        summary["runs"][item["name"]] = {
            "at_kimg": item["at_nimg"] / 1000, "points": [(e["sigma_rel"], e["metrics"][metric]) for e in rows],
            "best_sigma_rel": None if best is None else best["sigma_rel"],
            "best": None if best is None else best["metrics"][metric]}
        table = _run_table(item, rows, best, metric, int(settings["num_samples"]))
        atomic_write_text(item["run"] / "ema_sweep.md", table)
        _plot({item["name"]: summary["runs"][item["name"]]}, item["run"] / "ema_sweep.png", metric)
        print(table)
    if len(plan) > 1:
        atomic_write_text(root / "ema_sweep.md", _summary_table(summary, int(settings["num_samples"])))
        _plot(summary["runs"], root / "ema_sweep.png", metric)
        print(f"wrote {root / 'ema_sweep.md'} and {root / 'ema_sweep.png'}")
    return summary


def _run_table(item: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], best: Any, metric: str,
               num_samples: int) -> str:
    lines = [f"## Post-hoc EMA sweep: {item['name']}", "",
             f"- `{metric}` of {num_samples} samples; EMA reconstructed at {item['at_nimg'] / 1000:g} kimg from the "
             "run's power-function EMA snapshots (Karras et al. 2024, EDM2, Sec. 3)",
             "- fit residual: relative L² distance between the requested EMA profile and its least-squares "
             "combination of the tracked ones (0 = a tracked σ_rel)", "",
             f"| σ_rel | γ | {metric} | fit residual |", "|---|---|---|---|"]
    for e in rows:
        value = f"{e['metrics'][metric]:.4g}"
        if e is best:
            value = f"**{value}**"
        lines.append(f"| {e['sigma_rel']:g} | {e['gamma']:.3f} | {value} | {e['fit_residual']:.1e} |")
    return "\n".join(lines) + "\n"


def _summary_table(summary: Mapping[str, Any], num_samples: int) -> str:
    metric = summary["metric"]
    lines = [f"## Best post-hoc EMA length per run (`{metric}`, {num_samples} samples)", "",
             f"| run | at kimg | best σ_rel | best {metric} | σ_rel tried |", "|---|---|---|---|---|"]
    for name, r in summary["runs"].items():
        tried = ", ".join(f"{s:g}" for s, _ in r["points"])
        best = "—" if r["best"] is None else f"{r['best']:.4g}"
        best_s = "—" if r["best_sigma_rel"] is None else f"{r['best_sigma_rel']:g}"
        lines.append(f"| {name} | {r['at_kimg']:g} | {best_s} | {best} | {tried} |")
    return "\n".join(lines) + "\n"


def _plot(runs: Mapping[str, Mapping[str, Any]], path: Path, metric: str) -> Path:
    """The metric against σ_rel, one line per run, the best point of each marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, r in runs.items():
        if not r["points"]:
            continue
        xs, ys = zip(*sorted(r["points"]))
        line, = ax.plot(xs, ys, marker="o", markersize=3, label=name)
        if r["best_sigma_rel"] is not None:
            ax.plot([r["best_sigma_rel"]], [r["best"]], marker="*", markersize=11, color=line.get_color())
    ax.set_xlabel("EMA length σ_rel (post-hoc)")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
