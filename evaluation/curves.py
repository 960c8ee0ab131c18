"""Metric-vs-training curves (``evaluate.py run_dir=``) and the training images needed to reach a target.

Every checkpoint of a run (a directory with ``checkpoints/``), or of every run below a sweep directory, is
evaluated with the ``eval`` settings given on the command line (data and sampler: each run's own, unless
overridden); one JSON line per checkpoint is appended to ``<run>/fid_curve.jsonl`` (checkpoints already evaluated
with the same settings are skipped, so the command is resumable; the key says what the data and files are, not where
they lie: ``evaluation/curve_keys.py``); ``<run_dir>/fid_curve.png`` (metric vs kimg, one line per run, log y) and
``<run_dir>/fid_curve.md`` (images-to-reach-target table) are written.

The target is ``eval.target_fid``, else the baseline run's final value (the speed-up of InfoNoise, Raya et al.
2026, arXiv 2602.18647: the training images needed to reach the final quality of the baseline), else the largest of
the runs' best values. The kimg at which a run reaches it is reported twice: at the first checkpoint at or below the
target, and interpolated between that checkpoint and the one before (``eval.target_interpolation``: ``loglinear`` =
log FID linear in kimg, ``linear``, or ``none``); the speed-up column is baseline kimg / run kimg of the
interpolated value (``none``: of the checkpoint value), i.e. ">1: reaches the target with fewer training images than
the baseline".
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from configs import jsonable
from data.atomic import atomic_write_text
from evaluation.curve_keys import curve_settings, legacy_curve_settings, rekey_legacy_entries, settings_key
from evaluation.figures import plot_curves
from evaluation.protocol import evaluate_model, evaluate_plan, planned_evaluation
from evaluation.settings import (
    CURVE_FILE,
    check_metrics,
    eval_settings,
    primary_key,
    run_group,
)
from evaluation.sweep import report_rows, run_config
from training.checkpoint import CHECKPOINT_DIR, list_checkpoints, load_checkpoint, load_denoiser
from training.distributed import barrier, broadcast_object

__all__ = [
    "CURVE_FILE",
    "TARGET_INTERPOLATIONS",
    "check_interpolation",
    "find_runs",
    "run_name",
    "read_curve",
    "curve_settings",
    "settings_key",
    "kimg_to_reach",
    "target_table",
    "fmt_kimg",
    "run_curves",
    "run_last_checkpoints",
    "CHECKPOINT_CHOICES",
    "curve_baseline",
]

TARGET_INTERPOLATIONS = ("loglinear", "linear", "none")
CHECKPOINT_CHOICES = ("all", "last")  # eval.checkpoints: what run_dir= evaluates (a curve, or each run's newest)


def check_interpolation(interpolation: str) -> str:
    """``eval.target_interpolation``, checked."""
    if interpolation not in TARGET_INTERPOLATIONS:
        raise ValueError(f"unknown eval.target_interpolation {interpolation!r}; valid: "
                         f"{', '.join(TARGET_INTERPOLATIONS)}")
    return interpolation


def find_runs(root: str | os.PathLike) -> list[Path]:
    """``root`` itself if it is a run (holds ``checkpoints/``), else every run directory below it (a sweep)."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise FileNotFoundError(f"run_dir not found: {root}")
    if (root / CHECKPOINT_DIR).is_dir():
        return [root]
    runs = sorted({p.parent for p in root.rglob(CHECKPOINT_DIR) if p.is_dir() and list_checkpoints(p.parent)})
    if not runs:
        raise ValueError(f"no runs under {root}: a run directory holds {CHECKPOINT_DIR}/checkpoint-<nimg>.pt")
    return runs


def run_name(run: Path, root: Path) -> str:
    """A run's name in tables: its directory name, or its path relative to the sweep directory."""
    return run.name if run == root else run.relative_to(root).as_posix()


def read_curve(run_dir: str | os.PathLike, settings_key: str | None = None) -> list[dict[str, Any]]:
    """The entries of ``<run_dir>/fid_curve.jsonl`` (those with ``settings_key`` if given), by training images."""
    path = Path(run_dir) / CURVE_FILE
    entries = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash: that checkpoint is evaluated again
                continue
            if settings_key is None or entry.get("settings_key") == settings_key:
                entries.append(entry)
    return sorted(entries, key=lambda e: e["nimg"])


def kimg_to_reach(points: Sequence[tuple[float, float]], target: float,
                  interpolation: str = "loglinear") -> tuple[float | None, float | None]:
    """(kimg of the first checkpoint with value <= target, kimg interpolated between it and the previous one).

    ``loglinear``: log(value) linear in kimg; ``linear``; ``none`` (both numbers are the checkpoint's). A run
    already at the target at its first checkpoint gets that checkpoint's kimg twice; (None, None) if never reached.
    """
    check_interpolation(interpolation)
    points = sorted(points)
    for i, (kimg, value) in enumerate(points):
        if value <= target:
            if i == 0 or interpolation == "none":
                return kimg, kimg
            k0, v0 = points[i - 1]
            if interpolation == "loglinear" and value > 0 and target > 0:
                t = (math.log(v0) - math.log(target)) / (math.log(v0) - math.log(value))
            else:
                t = (v0 - target) / (v0 - value)
            return kimg, k0 + t * (kimg - k0)
    return None, None


def fmt_kimg(v: float) -> str:
    """A kimg value: one decimal from 10 kimg up, four significant digits below."""
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.4g}"


def target_table(curves: Mapping[str, Sequence[tuple[float, float]]], *, metric: str, target: float | None = None,
                 baseline: str | None = None, interpolation: str = "loglinear",
                 num_samples: int | None = None) -> tuple[str, dict[str, Any]]:
    """The images-to-reach-target table (Markdown) and its numbers; see the module docstring for the definitions."""
    curves = {name: sorted(points) for name, points in curves.items() if points}
    if not curves:
        raise ValueError("no evaluated checkpoints to tabulate")
    if baseline is not None:
        matches = [n for n in curves if n == baseline or n.rsplit("/", 1)[-1] == baseline]
        if len(matches) != 1:
            raise ValueError(f"eval.baseline_run={baseline!r} matches {len(matches)} runs; runs: {', '.join(curves)}")
        baseline = matches[0]
    if target is not None:
        source = "eval.target_fid"
    elif baseline is not None:
        target, source = curves[baseline][-1][1], f"final value of the baseline run '{baseline}'"
    else:
        target = max(min(v for _, v in points) for points in curves.values())
        source = "the largest of the runs' best values (every run reaches it)"
    rows = {}
    for name, points in curves.items():
        first, interp = kimg_to_reach(points, float(target), interpolation)
        best_kimg, best = min(points, key=lambda p: p[1])
        rows[name] = {"first_kimg": first, "kimg": interp, "final_kimg": points[-1][0], "final": points[-1][1],
                      "best": best, "best_kimg": best_kimg, "checkpoints": len(points),
                      "at_first_checkpoint": first is not None and first == points[0][0]}
    base_kimg = rows[baseline]["kimg"] if baseline is not None else None
    for row in rows.values():
        row["speedup"] = (base_kimg / row["kimg"]) if base_kimg and row["kimg"] else None
    summary = {"target": float(target), "target_source": source, "baseline": baseline,
               "interpolation": interpolation, "rows": rows}
    return _target_markdown(summary, metric, num_samples), summary


def _target_markdown(summary: Mapping[str, Any], metric: str, num_samples: int | None) -> str:
    """``target_table``'s Markdown."""
    target, baseline, interpolation = summary["target"], summary["baseline"], summary["interpolation"]

    def k(v: float | None, row: Mapping[str, Any] | None = None) -> str:
        if v is None:
            return "not reached"
        return ("≤ " if row is not None and row["at_first_checkpoint"] else "") + fmt_kimg(v)

    how = {"loglinear": "log(value) linear in kimg between the last checkpoint above the target and the first at or "
                        "below it",
           "linear": "value linear in kimg between the last checkpoint above the target and the first at or below it",
           "none": "not interpolated: the first checkpoint at or below the target"}[interpolation]
    lines = [f"## Training images to reach {metric} ≤ {target:.4g}", "",
             f"- metric: `{metric}`" + (f", {num_samples} samples per checkpoint" if num_samples else ""),
             f"- target: {target:.4g} ({summary['target_source']})",
             f"- kimg to target: {how} (eval.target_interpolation={interpolation}); '≤' = already reached at the "
             "first checkpoint",
             "- speed-up: kimg of the baseline / kimg of the run" + (f" (baseline: '{baseline}')" if baseline else
                                                                      " (no eval.baseline_run given)"), "",
             "| run | checkpoints | final kimg | final | best (kimg) | first checkpoint ≤ target (kimg) | "
             "kimg to target | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in summary["rows"].items():
        speed = f"{row['speedup']:.2f}x" if row["speedup"] else "—"
        lines.append(f"| {name} | {row['checkpoints']} | {fmt_kimg(row['final_kimg'])} | {row['final']:.4g} | "
                     f"{row['best']:.4g} ({fmt_kimg(row['best_kimg'])}) | {k(row['first_kimg'], row)} | "
                     f"{k(row['kimg'], row)} | {speed} |")
    return "\n".join(lines) + "\n"


def run_curves(cfg: Any, overrides: Sequence[str] = (), dist_info: Any = None) -> dict[str, Any]:
    """``run_dir=``: evaluate every checkpoint not yet in ``fid_curve.jsonl`` with these settings; plot and tabulate.

    Returns ``{"runs": {name: [(kimg, value), ...]}, "metric", "table", "plot", "summary"}`` on rank 0.
    """
    ctx = planned_evaluation(cfg, dist_info)
    settings = ctx.settings
    interpolation = check_interpolation(str(settings["target_interpolation"]))
    root = Path(os.path.expanduser(str(cfg.run_dir)))
    ema = bool(cfg.get("ema", True))
    plan = _curve_plan(find_runs(root), root, cfg, overrides, settings, ema, ctx.main)

    def evaluate(item: Mapping[str, Any], todo: Sequence[Path], get_reference: Callable[[], Any]) -> None:
        for ckpt in todo:
            _evaluate_checkpoint(item, ckpt, settings, get_reference, device=ctx.device, ema=ema,
                                 distributed=ctx.distributed, main=ctx.main)

    evaluate_plan(plan, ctx, lambda item, todo: f"[{item['name']}] {len(todo)} of {item['total']} checkpoints to "
                  f"evaluate (settings {item['key']})", evaluate)
    if not ctx.main:
        return {}
    return _summarise_curves(plan, settings, interpolation, root)


def _curve_plan(runs: Sequence[Path], root: Path, cfg: Any, overrides: Sequence[str], settings: Mapping[str, Any],
                ema: bool, main: bool) -> list[dict[str, Any]]:
    """The plan (the same on every rank): per run its data/sampler configs, and on rank 0 its curve key
    (``evaluation/curve_keys.py``; older points of the same settings re-keyed) and unevaluated checkpoints."""
    plan = []
    for run in runs:
        ckpts = list_checkpoints(run)
        run_cfg = OmegaConf.create(load_checkpoint(ckpts[0])["config"])
        data_cfg = run_group(run_cfg.get("data"), cfg.data, overrides, "data")
        sampler_cfg = run_group(run_cfg.get("sampler"), cfg.sampler, overrides, "sampler")
        settings_of_curve, key, done = None, None, set()
        if main:
            settings_of_curve = curve_settings(settings, data_cfg, sampler_cfg, ema)
            key = settings_key(settings_of_curve)
            rekeyed = rekey_legacy_entries(run, key, settings_of_curve,
                                           legacy_curve_settings(settings, data_cfg, sampler_cfg, ema))
            if rekeyed:
                print(f"[{run_name(run, root)}] {rekeyed} points of an older curve file re-keyed ({key})", flush=True)
            done = {e["checkpoint"] for e in read_curve(run, key)}
        todo = [str(p) for p in ckpts if p.name not in done]
        plan.append({"run": run, "name": run_name(run, root), "data": data_cfg, "sampler": sampler_cfg,
                     "settings": settings_of_curve, "key": key, "todo": todo, "total": len(ckpts)})
    return plan


def _evaluate_checkpoint(item: Mapping[str, Any], ckpt: str, settings: Mapping[str, Any], get_reference: Any, *,
                         device: Any, ema: bool, distributed: bool, main: bool) -> None:
    """Evaluate one checkpoint (all ranks) and append its line to the run's curve file (rank 0)."""
    t0 = time.time()
    denoiser, _ = load_denoiser(ckpt, ema=ema, device=device)
    result = evaluate_model(denoiser, item["data"], item["sampler"], settings, device=device,
                            get_reference=get_reference, distributed=distributed)
    if not main:
        return
    nimg = int(re.search(r"(\d+)\.pt$", ckpt).group(1))
    entry = {"run": item["name"], "checkpoint": Path(ckpt).name, "nimg": nimg, "kimg": nimg / 1000,
             "settings_key": item["key"], "metrics": result["metrics"], "num_samples": result["num_samples"],
             "seeds": result["seeds"], "nfe": result.get("nfe"), "num_steps": result.get("num_steps"),
             "repeats": [{"seeds": r["seeds"], "num_samples": r["num_images"], "metrics": r["metrics"]}
                         for r in result["repeats"]],
             "likelihood": result["likelihood"], "settings": item["settings"],
             "seconds": round(time.time() - t0, 2), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(item["run"] / CURVE_FILE, "a") as f:
        f.write(json.dumps(jsonable(entry), allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    shown = ", ".join(f"{k} = {v:.4g}" for k, v in result["metrics"].items())
    print(f"[{item['name']}] {Path(ckpt).name} ({fmt_kimg(nimg / 1000)} kimg): {shown}", flush=True)


def _summarise_curves(plan: Sequence[Mapping[str, Any]], settings: Mapping[str, Any], interpolation: str,
                      root: Path) -> dict[str, Any]:
    """Read back every run's curve; write ``fid_curve.png`` and ``fid_curve.md`` into ``root``."""
    entries = {item["name"]: read_curve(item["run"], item["key"]) for item in plan}
    available = list(dict.fromkeys(k for es in entries.values() for e in es for k in e["metrics"]))
    metric = settings.get("curve_metric") or primary_key(dict.fromkeys(available, 0.0))[0]
    if metric not in available:
        raise ValueError(f"eval.curve_metric={metric!r} is not among the evaluated metrics: {', '.join(available)}")
    curves = {name: [(e["kimg"], e["metrics"][metric]) for e in es if metric in e["metrics"]]
              for name, es in entries.items()}
    n_samples = int(settings["num_samples"]) if any(m != "nll" for m in check_metrics(settings["metrics"])) else None
    target = settings.get("target_fid")
    baseline, note = curve_baseline(settings.get("baseline_run"), {item["name"]: item["run"] for item in plan}, root)
    if note:
        print(note)
    table, summary = target_table(curves, metric=metric, target=None if target is None else float(target),
                                  baseline=baseline, interpolation=interpolation, num_samples=n_samples)
    title = f"{metric}" + (f", {n_samples} samples" if n_samples else "") + f" ({root.name})"
    plot = plot_curves(curves, root / "fid_curve.png", metric=metric, title=title, target=summary["target"])
    (root / "fid_curve.md").write_text(table)
    print(table)
    print(f"wrote {plot} and {root / 'fid_curve.md'}")
    return {"runs": curves, "metric": metric, "table": table, "plot": str(plot), "summary": summary}


def run_last_checkpoints(cfg: Any, overrides: Sequence[str], dist_info: Any,
                         evaluate: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """``run_dir=<run or sweep> eval.checkpoints=last`` (``eval=nll`` sets it): the newest checkpoint of every run,
    evaluated as ``evaluate.py ckpt=<it> out=<run>/eval-<eval.name>.json`` would (``evaluate`` is that mode), so the
    report (``report=``) reads each run's final likelihood or FID-50k as extra columns. A run whose file already holds
    its newest checkpoint evaluated with the same settings (the curve key of ``evaluation/curve_keys.py``, recorded as
    ``settings_key``) is skipped. Returns ``{"runs": {name: record}, "skipped": [names]}`` on rank 0."""
    settings = eval_settings(cfg.eval)
    root = Path(os.path.expanduser(str(cfg.run_dir)))
    main = dist_info is None or dist_info.rank == 0
    ema = bool(cfg.get("ema", True))
    plan = []
    for run in find_runs(root):
        out, newest = run / f"eval-{settings['name']}.json", list_checkpoints(run)[-1]
        key = None
        if main:
            run_cfg = OmegaConf.create(run_config(run))
            data_cfg = run_group(run_cfg.get("data"), cfg.data, overrides, "data")
            sampler_cfg = run_group(run_cfg.get("sampler"), cfg.sampler, overrides, "sampler")
            key = settings_key(curve_settings(settings, data_cfg, sampler_cfg, ema))
        plan.append((run, out, newest, key, main and _already_evaluated(out, newest, key)))
    skip = broadcast_object([p[4] for p in plan])
    records: dict[str, Any] = {}
    for (run, out, newest, key, _), done in zip(plan, skip):
        name = run_name(run, root)
        if done:
            if main:
                print(f"[{name}] {out.name} already holds {newest.name} with these settings ({key}): skipped")
            continue
        if main:
            print(f"[{name}] evaluating {newest.name} -> {out}", flush=True)
        record = evaluate(OmegaConf.merge(cfg, {"run_dir": None, "ckpt": str(newest), "out": str(out)}))
        if main:
            record["settings_key"] = key
            atomic_write_text(out, json.dumps(jsonable(record), indent=2, allow_nan=False) + "\n")
            records[name] = record
    barrier()
    return {"runs": records, "skipped": [run_name(p[0], root) for p, done in zip(plan, skip) if done]} if main else {}


def _already_evaluated(out: Path, newest: Path, key: str | None) -> bool:
    """Whether ``out`` (an ``eval-*.json``) holds ``newest`` evaluated with the settings of curve key ``key``."""
    try:
        record = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (isinstance(record, dict) and record.get("settings_key") == key
            and Path(str(record.get("ckpt", ""))).name == newest.name)


def curve_baseline(baseline: str | None, runs: Mapping[str, Path], root: Path) -> tuple[str | None, str | None]:
    """``eval.baseline_run`` for the per-run table: a run name, or a row label of the report (``lognormal``: the
    runs whose settings are the log-normal schedule, see ``report_rows``) -> that run if it is the only one, else
    no baseline (the seeds are averaged by ``evaluate.py report=``). Returns (baseline, note to print)."""
    if baseline is None or any(n == baseline or n.rsplit("/", 1)[-1] == baseline for n in runs):
        return baseline, None
    try:
        labels, _, _ = report_rows([run_config(run) for run in runs.values()])
    except (OSError, ValueError):
        return baseline, None  # target_table names the runs in its error
    members = [name for name, label in zip(runs, labels) if label == baseline]
    if len(members) == 1:
        return members[0], f"eval.baseline_run={baseline!r}: the run {members[0]}"
    if members:
        return None, (f"eval.baseline_run={baseline!r} is the setting of {len(members)} runs (seeds): the per-run "
                      f"table has no speed-ups; python evaluate.py report={root} averages the seeds and gives them")
    return baseline, None
