"""The sweep report (``evaluate.py report=<sweep dir>``; a sweep of sweeps or a single run work too): a sweep's
curves as the papers' tables.

Reads every run's ``config.yaml`` and ``fid_curve.jsonl`` (no model is loaded; run ``evaluate.py run_dir=<sweep>``
first) and writes ``report.md``, ``report.json`` and ``fid_vs_kimg.png`` into ``<sweep>/report`` (or ``out=``). One
table per data config; rows = the settings the runs differ in besides the seed, labelled from the configs
(``evaluation/sweep.py``, ``report_rows``: the varied group names such as schedule, precond, weighting, then single
keys such as ``train.lr``, the fewest that tell the rows apart); the seeds of a row are averaged: cells are mean ±
sample std (n − 1) over seeds (n). Evaluation variants (curve settings set on the ``run_dir=`` command line that
differ within a run, e.g. ``sampler.guidance`` or ``eval.num_samples``) get their own tables, and columns side by
side in the final table.

Tables: the metric at every checkpoint's kimg; the final value (the last kimg evaluated for every seed), with the
metrics of ``eval-*.json`` files in the run (e.g. ``ckpt=<run> eval=nll``) as extra columns; the images-to-target
table on the seed-mean curves (target: the baseline row's final value or ``eval.target_fid``; baseline:
``eval.baseline_run`` = a row label, default the row ``lognormal`` where there is one; crossing as
``kimg_to_reach`` of ``evaluation/curves.py``), with the same crossing per seed. A run's ``paper:`` node (experiment
presets) adds the published numbers beside the measured ones: ``paper.fid`` (a number, or {guidance: FID} matched
to the variant's ``sampler.guidance``), ``paper.fid_by_kimg`` beside the kimg columns, ``paper.speedup_*`` beside
the speed-ups. Runs without a curve are an error naming the command to run. ``eval.num_samples=`` (``seed``,
``seed_repeats``, ``metrics``) and ``sampler.<key>=`` on the report's command line keep only the points evaluated
with those settings (e.g. ``sampler.guidance=3.0``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import Container, OmegaConf

from configs import flatten, jsonable
from evaluation.curves import CURVE_FILE, check_interpolation, kimg_to_reach, read_curve, run_name, target_table
from evaluation.figures import plot_report
from evaluation.report_format import format_report, setup_line, unverified_values
from evaluation.settings import eval_settings, primary_key, short_hash
from evaluation.sweep import ABSENT, canon, find_report_runs, job_num, report_rows, run_config, short
from training.checkpoint import CHECKPOINT_DIR, list_checkpoints

__all__ = [
    "REPORT_DIR",
    "DEFAULT_BASELINE_ROW",
    "collect_report",
    "report_json",
    "sweep_report",
    "report_selection",
]

REPORT_DIR = "report"
DEFAULT_BASELINE_ROW = "lognormal"  # EDM's schedule: the baseline of the digits sweeps and of InfoNoise's speed-up
_SELECTABLE_EVAL_KEYS = ("num_samples", "seed", "seed_repeats", "metrics")


@dataclasses.dataclass
class _Sweep:
    """What the tables of one report share."""

    root: Path
    configs: dict[Path, dict[str, Any]]
    curves: dict[Path, list[dict[str, Any]]]
    settings: dict[str, Any]
    interpolation: str
    select: Mapping[str, Any] | None
    notes: list[str]


@dataclasses.dataclass
class _Table:
    """One data config's runs, grouped into rows."""

    title: str
    members: list[Path]
    rows: dict[str, dict[str, Any]]
    order: list[str]
    label_of: dict[Path, str]
    baseline: str | None


def collect_report(root: str | os.PathLike, eval_cfg: Any = None,
                   select: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every number of the report of a sweep (or a sweep of sweeps, or one run), without writing anything.

    Runs are grouped into tables by their ``data`` config, and within a table into rows by their settings
    (``report_rows``; the seeds of a setting are averaged). Each run's ``fid_curve.jsonl`` entries are split into
    evaluation variants (settings of ``evaluate.py run_dir=`` such as the number of samples or the guidance scale).
    ``eval_cfg`` keys used: ``curve_metric``, ``target_fid``, ``target_interpolation``, ``baseline_run`` (a row
    label; default: the row labelled ``lognormal`` where there is one). ``select`` keeps only the curve points
    evaluated with these settings (``{"num_samples": 1000, "sampler.guidance": 3.0}``; the CLI passes the ``eval.`` /
    ``sampler.`` keys set on its command line).
    """
    settings = eval_settings(eval_cfg)
    interpolation = check_interpolation(str(settings["target_interpolation"]))
    root = Path(os.path.expanduser(str(root)))
    runs = find_report_runs(root)
    curves = {run: read_curve(run) for run in runs}
    _require_curves(runs, curves, root)
    sweep = _Sweep(root, {run: run_config(run) for run in runs}, curves, settings, interpolation, select, [])
    by_data, titles = _data_groups(runs, sweep.configs)
    tables = [_collect_table(sweep, members, titles[key]) for key, members in by_data.items()]
    baseline_wanted = settings.get("baseline_run")
    if baseline_wanted is not None and all(t["baseline"] is None for t in tables):
        rows_text = "; ".join(f"{t['title']}: {', '.join(t['order'])}" for t in tables)
        raise ValueError(f"eval.baseline_run={baseline_wanted!r} names no row of the report; rows: {rows_text}")
    return {"root": str(root), "tables": tables, "notes": list(dict.fromkeys(sweep.notes)),
            "target_fid": settings.get("target_fid"), "interpolation": interpolation,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def _require_curves(runs: Sequence[Path], curves: Mapping[Path, list], root: Path) -> None:
    """Refuse runs without a curve, naming the command that makes them."""
    missing = [run for run in runs if not curves[run]]
    if missing:
        names = ", ".join(run_name(r, root) for r in missing[:3]) + (f" and {len(missing) - 3} more"
                                                                      if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"report: {len(missing)} of {len(runs)} runs under {root} have no FID curve ({CURVE_FILE}): {names}. "
            f"Evaluate their checkpoints first: python evaluate.py run_dir={root} eval.num_samples=<N> — then run "
            f"python evaluate.py report={root} again")


def _data_groups(runs: Sequence[Path], configs: Mapping[Path, Mapping[str, Any]]
                 ) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """The runs grouped by data config, and a title per group (the data name, and how configs of one name
    differ)."""
    by_data: dict[str, list[Path]] = {}
    for run in runs:
        by_data.setdefault(canon(configs[run].get("data")), []).append(run)
    names = {key: str(configs[members[0]].get("data", {}).get("name")) for key, members in by_data.items()}
    titles = dict(names)
    for key in by_data:
        same = [k for k in by_data if names[k] == names[key]]
        if len(same) > 1:  # two data configs of one name: say how they differ
            flats = {k: flatten(configs[by_data[k][0]].get("data") or {}) for k in same}
            diff = [f"{dk}={short(v)}" for dk, v in flats[key].items()
                    if len({canon(f.get(dk)) for f in flats.values()}) > 1]
            titles[key] = f"{names[key]} ({', '.join(diff)})"
    return by_data, titles


def _collect_table(sweep: _Sweep, members: list[Path], title: str) -> dict[str, Any]:
    """One table of the report: its rows, evaluation variants, extra metrics and setup line."""
    configs = sweep.configs
    labels, aspects, columns = report_rows([configs[r] for r in members])
    rows, order = _table_rows(sweep, members, labels, aspects, title)
    table = _Table(title, members, rows, order, dict(zip(members, labels)), _table_baseline(sweep, rows, order, title))
    variants = _collect_variants(sweep, members, title)
    vlabels = _variant_labels(variants)
    table_variants = [_variant_table(sweep, table, vid, variants[vid], vlabels[vid])
                      for vid in sorted(variants, key=lambda v: tuple(_sort_value(p.split("=", 1)[-1])
                                                                       for p in vlabels[v].split(", ")))]
    final_setup = setup_line([configs[r] for r in members], [v["settings"] for v in table_variants],
                             [len(r["seed_curves"]) for v in table_variants for r in v["rows"].values()],
                             table_variants[0]["metric"] if table_variants else "fid")
    extras = _extra_metrics(members, table.label_of, sweep.root, sweep.notes)
    batches = {configs[r].get("train", {}).get("batch") for r in members}
    return {"title": title, "data": configs[members[0]].get("data"), "columns": columns,
            "rows": {lab: {k: v for k, v in rows[lab].items() if k != "order"} for lab in order},
            "order": order, "baseline": table.baseline, "variants": table_variants, "extras": extras,
            "setup": final_setup, "batch": batches.pop() if len(batches) == 1 else None}


def _table_rows(sweep: _Sweep, members: Sequence[Path], labels: Sequence[str], aspects: Sequence[dict],
                title: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The rows of a table (label, label cells, runs with their seeds, published numbers) in sweep order: rows that
    differ from the usual setting (a ``key=value`` in the label) after those that do not, then by the sweep
    directory they came from (a sweep of sweeps keeps each sweep's rows together) and the Hydra job number."""
    rows: dict[str, dict[str, Any]] = {}
    for run, label, cells in zip(members, labels, aspects):
        row = rows.setdefault(label, {"label": label, "aspects": cells, "runs": [], "order": (math.inf,),
                                      "paper": sweep.configs[run].get("paper"),
                                      "unverified": unverified_values(sweep.configs[run].get("schedule"))})
        seed = sweep.configs[run].get("seed")
        row["runs"].append({"dir": str(run), "name": run_name(run, sweep.root), "seed": seed})
        job = job_num(run)
        order = (any("=" in part for part in label.split("/")), str(run.parent), job if job is not None else math.inf)
        row["order"] = min(row["order"], order)
    for row in rows.values():
        seeds = [r["seed"] for r in row["runs"]]
        if len(set(map(str, seeds))) < len(seeds):
            sweep.notes.append(f"{title} / {row['label']}: several runs share a seed ({short(seeds)}); each is counted")
    return rows, sorted(rows, key=lambda lab: (rows[lab]["order"], lab))


def _table_baseline(sweep: _Sweep, rows: Mapping[str, Any], order: Sequence[str], title: str) -> str | None:
    """The baseline row of a table: ``eval.baseline_run``, else ``lognormal`` where there is such a row."""
    wanted = sweep.settings.get("baseline_run")
    baseline = wanted if wanted is not None else (DEFAULT_BASELINE_ROW if DEFAULT_BASELINE_ROW in rows else None)
    if baseline is not None and baseline not in rows:
        sweep.notes.append(f"{title}: baseline row {baseline!r} not in this table (rows: {', '.join(order)}); no "
                           "speed-ups")
        baseline = None
    return baseline


def _collect_variants(sweep: _Sweep, members: Sequence[Path], title: str) -> dict[str, dict[str, Any]]:
    """The evaluation variants of a table's curve points (those matching ``select``) and every run's points in
    each."""
    variants: dict[str, dict[str, Any]] = {}
    for run in members:
        run_sampler = jsonable(sweep.configs[run].get("sampler") or {})
        for entry in sweep.curves[run]:
            if sweep.select and not _entry_matches(entry, sweep.select):
                continue
            vid, vsettings, override = _variant_of(entry, run_sampler)
            variant = variants.setdefault(vid, {"settings": vsettings, "override": override,
                                                "sampler": (entry.get("settings") or {}).get("sampler") or {},
                                                "points": {}, "metrics": {}})
            variant["points"].setdefault(run, {})[float(entry["kimg"])] = entry.get("metrics") or {}
            for k in entry.get("metrics") or {}:
                variant["metrics"][k] = None
    if not variants:
        evaluated = sorted({short((e.get("settings") or {}).get("num_samples"))
                            for r in members for e in sweep.curves[r]})
        raise ValueError(f"report: no curve points of {title} were evaluated with "
                         f"{', '.join(f'{k}={short(v)}' for k, v in (sweep.select or {}).items())} (num_samples "
                         f"evaluated: {', '.join(evaluated)}); drop the setting or evaluate with it first")
    return variants


def _variant_table(sweep: _Sweep, table: _Table, vid: str, variant: Mapping[str, Any], vlabel: str) -> dict[str, Any]:
    """The numbers of one evaluation variant of a table: per row the seed statistics at every kimg, the final
    value, the published numbers and the crossing of the target."""
    available = list(variant["metrics"])
    metric = sweep.settings.get("curve_metric") or primary_key(dict.fromkeys(available, 0.0))[0]
    if metric not in available:
        raise ValueError(f"eval.curve_metric={metric!r} is not among the evaluated metrics: {', '.join(available)}")
    for run, pts in variant["points"].items():
        n_ckpts = len(list_checkpoints(run))
        if n_ckpts > len(pts):
            sweep.notes.append(f"{run_name(run, sweep.root)}: the curve{' (' + vlabel + ')' if vlabel else ''} covers "
                               f"{len(pts)} of its {n_ckpts} checkpoints (python evaluate.py run_dir={sweep.root} "
                               "with the same eval settings evaluates the rest)")
    seed_curves = _seed_curves(sweep, table, variant, metric)
    guidance = variant["sampler"].get("guidance", 1.0)
    vrows = {}
    for lab in table.order:
        if seed_curves[lab]:
            vrows[lab] = _variant_row(sweep, table, lab, seed_curves[lab], guidance)
    target_summary = _targets(sweep, table, vrows, metric)
    settings = {**variant["settings"], "sampler": variant["sampler"]}
    return {
        "id": vid, "label": vlabel, "metric": metric, "lower_is_better": not metric.startswith("isc_"),
        "settings": settings, "guidance": guidance,
        "kimg": sorted({k for lab in table.order for _, c in seed_curves[lab] for k in c}),
        "rows": vrows, "target": target_summary,
        "setup": setup_line([sweep.configs[r] for r in table.members], [settings],
                            [len(vrows[lab]["seed_curves"]) for lab in vrows], metric),
    }


def _seed_curves(sweep: _Sweep, table: _Table, variant: Mapping[str, Any],
                 metric: str) -> dict[str, list[tuple[dict, dict[float, float]]]]:
    """Per row, (run info, {kimg: value}) of each of its runs (seeds); non-finite values are left out (noted)."""
    seed_curves: dict[str, list[tuple[dict, dict[float, float]]]] = {lab: [] for lab in table.order}
    for run, pts in variant["points"].items():
        curve = {k: float(m[metric]) for k, m in pts.items() if metric in m}
        bad = sorted(k for k, v in curve.items() if not math.isfinite(v))
        if bad:
            sweep.notes.append(f"{run_name(run, sweep.root)}: non-finite {metric} at kimg {', '.join(map(short, bad))}"
                               " (left out)")
            curve = {k: v for k, v in curve.items() if math.isfinite(v)}
        if curve:
            label = table.label_of[run]
            info = next(r for r in table.rows[label]["runs"] if r["dir"] == str(run))
            seed_curves[label].append((info, curve))
    return seed_curves


def _variant_row(sweep: _Sweep, table: _Table, lab: str, sc: list[tuple[dict, dict[float, float]]],
                 guidance: Any) -> dict[str, Any]:
    """One row of a variant: statistics over seeds at every kimg, the seed-mean curve over the kimg every seed
    reached, the final value and the published numbers at the variant's guidance."""
    cells = {}
    for k in sorted({k for _, c in sc for k in c}):
        have = [(info, c[k]) for info, c in sc if k in c]
        cells[k] = {**_stats([v for _, v in have]), "seeds": [info["seed"] for info, _ in have]}
    complete = [k for k in sorted(cells) if cells[k]["n"] == len(sc)]
    last_seen = {max(c) for _, c in sc}
    if complete and len(last_seen) > 1:
        sweep.notes.append(f"{table.title} / {lab}: the seeds' curves end at different kimg "
                           f"({', '.join(short(k) for k in sorted(last_seen))}); final = {short(complete[-1])}"
                           " kimg, the last point evaluated for every seed")
    paper = table.rows[lab]["paper"]
    return {"cells": cells, "mean_curve": [(k, cells[k]["mean"]) for k in complete],
            "final_kimg": complete[-1] if complete else None,
            "final": cells[complete[-1]] if complete else None,
            "paper_final": _paper_final(paper, guidance), "paper_by_kimg": _paper_by_kimg(paper, guidance),
            "seed_curves": sc}


def _targets(sweep: _Sweep, table: _Table, vrows: Mapping[str, dict[str, Any]], metric: str) -> dict | None:
    """``target_table``'s numbers on the seed-mean curves; adds each row's ``target`` (with the per-seed
    crossings and the published speed-up)."""
    mean_curves = {lab: r["mean_curve"] for lab, r in vrows.items() if r["mean_curve"]}
    if not mean_curves:
        return None
    base = table.baseline if table.baseline in mean_curves else None
    target = sweep.settings.get("target_fid")
    _, summary = target_table(mean_curves, metric=metric, target=None if target is None else float(target),
                              baseline=base, interpolation=sweep.interpolation)
    for lab, r in vrows.items():
        tr = summary["rows"].get(lab)
        per_seed = [kimg_to_reach(sorted(c.items()), summary["target"], sweep.interpolation)[1]
                    for _, c in r["seed_curves"]]
        reached = [k for k in per_seed if k is not None]
        r["target"] = {**(tr or {}), "per_seed_kimg": per_seed, "per_seed": _stats(reached) if reached else None,
                       "reached": len(reached), "paper_speedup": _paper_speedups(table.rows[lab]["paper"])}
    return summary


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n − 1; None for one value) over seeds."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else None, "n": len(arr),
            "values": [float(v) for v in arr]}


def _num_eq(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return False


def _paper_final(paper: Mapping[str, Any] | None, guidance: Any) -> float | None:
    """The published final FID of a row at the variant's guidance (``paper.fid``: a number or {guidance: fid})."""
    if not paper or paper.get("fid") is None:
        return None
    fid = paper["fid"]
    if isinstance(fid, Mapping):
        return next((float(v) for k, v in fid.items() if _num_eq(k, guidance) and v is not None), None)
    return float(fid)


def _paper_by_kimg(paper: Mapping[str, Any] | None, guidance: Any) -> dict[float, float]:
    """``paper.fid_by_kimg`` ({kimg: fid}), if the paper's guidance list (when given) holds the variant's."""
    if not paper or not paper.get("fid_by_kimg"):
        return {}
    listed = paper.get("guidance")
    if listed and not any(_num_eq(g, guidance) for g in listed):
        return {}
    return {float(k): float(v) for k, v in paper["fid_by_kimg"].items() if v is not None}


def _paper_speedups(paper: Mapping[str, Any] | None) -> str | None:
    if not paper:
        return None
    items = [f"{float(v):g}x" + (f" vs {k[len('speedup_vs_'):]}" if k.startswith("speedup_vs_") else "")
             for k, v in paper.items() if str(k).startswith("speedup") and v is not None]
    return ", ".join(items) or None


def _variant_of(entry: Mapping[str, Any], run_sampler: Mapping[str, Any]) -> tuple[str, dict, dict]:
    """(id, settings without the sampler, sampler keys set differently from the run's own sampler config)."""
    settings = dict(entry.get("settings") or {})
    sampler = settings.pop("sampler", None) or {}
    override = {k: v for k, v in sampler.items() if run_sampler.get(k, ABSENT) != v}
    return canon({"settings": settings, "sampler": override}), settings, override


def _sort_value(value: Any) -> tuple[int, Any]:
    try:
        return (0, float(value))
    except (TypeError, ValueError):
        return (1, str(value))


def _variant_labels(variants: Mapping[str, dict]) -> dict[str, str]:
    """A label per evaluation variant: the settings that differ between the variants (``guidance=1.5``)."""
    if len(variants) < 2:
        return {vid: "" for vid in variants}
    override_keys = sorted({k for v in variants.values() for k in v["override"]})
    flats = {}
    for vid, v in variants.items():
        flat = flatten({k: val for k, val in v["settings"].items()})
        flat.update({f"sampler.{k}": v["sampler"].get(k) for k in override_keys})
        flats[vid] = {k: canon(val) for k, val in flat.items()}
    keys = list(dict.fromkeys(k for f in flats.values() for k in f))
    varied = [k for k in keys if len({f.get(k, ABSENT) for f in flats.values()}) > 1]
    labels = {}
    for vid, flat in flats.items():
        parts = [f"{k.removeprefix('sampler.')}={short(json.loads(flat[k]))}" for k in varied if k in flat]
        labels[vid] = ", ".join(parts) or f"settings {short_hash(vid)}"
    return labels


def _extra_metrics(members: Sequence[Path], label_of: Mapping[Path, str], root: Path,
                   notes: list[str]) -> dict[str, dict[str, Any]]:
    """Final metrics of ``evaluate.py ckpt=<run> ...`` (``eval-*.json`` in a run or its checkpoints/): per column
    ``<metric> (<file stem>)`` and row, their mean ± std over the row's runs."""
    values: dict[str, dict[str, list[float]]] = {}
    for run in members:
        files = sorted(run.glob("eval-*.json")) + sorted((run / CHECKPOINT_DIR).glob("eval-*.json"))
        ckpts = list_checkpoints(run)
        for path in files:
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                notes.append(f"{path}: not readable JSON; skipped")
                continue
            metrics = record.get("metrics") if isinstance(record, Mapping) else None
            if not isinstance(metrics, Mapping):
                continue
            _note_stale(path, record, ckpts, root, notes)
            for key, value in metrics.items():
                if key.endswith(("_sem", "_std")) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue
                column = f"{key} ({path.stem})"
                values.setdefault(column, {}).setdefault(label_of[run], []).append(float(value))
    return {col: {lab: _stats(v) for lab, v in per_row.items()} for col, per_row in values.items()}


def _note_stale(path: Path, record: Mapping[str, Any], ckpts: Sequence[Path], root: Path, notes: list[str]) -> None:
    """Note an ``eval-*.json`` that may not describe the run's newest checkpoint."""
    shown = path.relative_to(root) if path.is_relative_to(root) else path
    evaluated = re.search(r"checkpoint-(\d+)\.pt$", str(record.get("ckpt", "")))
    newest = ckpts[-1].stat().st_mtime if ckpts else None
    if evaluated and ckpts and ckpts[-1].name != Path(evaluated.group(0)).name:
        notes.append(f"{shown}: evaluates {evaluated.group(0)}, not the run's newest checkpoint {ckpts[-1].name}")
    elif not evaluated and newest is not None and path.stat().st_mtime < newest:
        notes.append(f"{shown}: written before the run's newest checkpoint (it may describe an earlier one)")


def report_json(report: Mapping[str, Any]) -> dict[str, Any]:
    """``collect_report``'s numbers in JSON form (kimg keys as lists of points)."""
    tables = []
    for table in report["tables"]:
        variants = []
        for v in table["variants"]:
            rows = {lab: _row_json(r) for lab, r in v["rows"].items()}
            variants.append({"label": v["label"], "metric": v["metric"], "lower_is_better": v["lower_is_better"],
                             "settings": v["settings"], "setup": v["setup"], "kimg": v["kimg"], "rows": rows,
                             "target": v["target"] and {k: val for k, val in v["target"].items() if k != "rows"}})
        tables.append({"title": table["title"], "data": table["data"], "columns": table["columns"],
                       "baseline": table["baseline"], "setup": table["setup"],
                       "rows": [{"label": lab, **{k: val for k, val in table["rows"][lab].items() if k != "label"}}
                                for lab in table["order"]],
                       "variants": variants, "extra_metrics": table["extras"]})
    return {"root": report["root"], "time": report["time"], "interpolation": report["interpolation"],
            "target_fid": report["target_fid"], "tables": tables, "notes": report["notes"]}


def _row_json(r: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "points": [{"kimg": k, **c} for k, c in r["cells"].items()],
        "mean_curve": [{"kimg": k, "mean": m} for k, m in r["mean_curve"]],
        "final_kimg": r["final_kimg"], "final": r["final"], "paper_final": r["paper_final"],
        "paper_by_kimg": [{"kimg": k, "value": p} for k, p in sorted(r["paper_by_kimg"].items())],
        "target": r.get("target"),
        "seeds": [{"seed": info["seed"], "run": info["name"], "curve": [{"kimg": k, "value": c[k]} for k in sorted(c)]}
                  for info, c in r["seed_curves"]],
    }


def sweep_report(root: str | os.PathLike, out_dir: str | os.PathLike | None = None, eval_cfg: Any = None,
                 select: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``evaluate.py report=<sweep dir>``: write ``report.md``, ``report.json`` and ``fid_vs_kimg.png`` into
    ``out_dir`` (default ``<root>/report``); returns ``collect_report``'s numbers with ``files`` and ``markdown``."""
    report = collect_report(root, eval_cfg, select)
    out = Path(os.path.expanduser(str(out_dir))) if out_dir else Path(report["root"]) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_report(report, out / "fid_vs_kimg.png")
    markdown = format_report(report, plot.name)
    (out / "report.md").write_text(markdown)
    (out / "report.json").write_text(json.dumps(jsonable(report_json(report)), indent=1, allow_nan=False) + "\n")
    files = {"markdown": out / "report.md", "json": out / "report.json", "plot": plot}
    print(markdown)
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return {**report, "markdown": markdown, "files": {k: str(v) for k, v in files.items()}}


def report_selection(cfg: Any, overrides: Sequence[str]) -> dict[str, Any]:
    """The curve settings set on the report's command line (``eval.num_samples=1000``, ``sampler.guidance=3``)."""
    select = {}
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if (key.startswith("eval.") and key[5:] in _SELECTABLE_EVAL_KEYS) or key.startswith("sampler."):
            value = OmegaConf.select(cfg, key)
            value = OmegaConf.to_container(value) if isinstance(value, Container) else value
            select[key[5:] if key.startswith("eval.") else key] = value
    return select


def _entry_matches(entry: Mapping[str, Any], select: Mapping[str, Any]) -> bool:
    settings = entry.get("settings") or {}
    for key, wanted in select.items():
        have = (settings.get("sampler") or {}).get(key[8:]) if key.startswith("sampler.") else settings.get(key)
        if not (have == wanted or _num_eq(have, wanted) or canon(have) == canon(wanted)):
            return False
    return True
