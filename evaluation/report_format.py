"""The Markdown of the sweep report (``evaluation/report.py`` collects the numbers): per data config the
metric-vs-kimg tables, the final table and the images-to-target tables, in the papers' layout (rows = settings,
published numbers in adjacent columns).

Each table's setup line also states what a schedule comparison must hold fixed or disclose: the training noise's
support (``schedule.sigma_range``), its logSNR convention (``schedule.snr_reference``), how the σ's are drawn
(``train.sigma_draw``) and the EMA length of the evaluated weights (which changes FID at a given kimg); a setting that
differs between rows is listed per row. Rows whose schedule has parameters no readable source fixes (the config's
``unverified`` list) are marked † and the values are listed under the final table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evaluation.curves import fmt_kimg
from evaluation.settings import DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR
from evaluation.sweep import report_rows, short

__all__ = ["format_report", "fmt_stat", "report_kimg", "kimg_header", "setup_line", "schedule_support",
           "unverified_values", "training_noise_text"]

UNVERIFIED_MARK = "†"

_EXTRACTOR_SHORT = {DIGITS_EXTRACTOR: "digits-classifier features (not Inception)",
                    INCEPTION_EXTRACTOR: "Inception-v3 features"}


def _decimals(value: float) -> int:
    a = abs(value)
    if a >= 100:
        return 1
    if a >= 1 or a == 0:
        return 2
    return min(6, 2 - math.floor(math.log10(a)))


def fmt_stat(stat: Mapping[str, Any] | None, bold: bool = False) -> str:
    """``mean ± std (n)``, or ``mean (1)`` for a single seed; ``—`` when missing."""
    if not stat:
        return "—"
    d = _decimals(stat["mean"])
    text = f"{stat['mean']:.{d}f}"
    text = f"**{text}**" if bold else text
    if stat["std"] is not None:
        text += f" ± {stat['std']:.{d}f}"
    return text + f" ({stat['n']})"


def _fmt_paper(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def report_kimg(kimg: float) -> str:
    """A kimg value for a table: one decimal at most from 10 kimg up (a checkpoint lands on a whole batch, so
    30 kimg at batch 128 is 30.08: shown 30.1), four significant digits below."""
    return f"{round(kimg, 1):g}" if abs(kimg) >= 10 else f"{kimg:.4g}"


def kimg_header(kimg: float, batch: int | None) -> str:
    """A kimg column header, with the iteration count when it is a whole number of thousands from 1K up."""
    text = f"{report_kimg(kimg)} kimg"
    if batch:
        iters = kimg * 1000 / batch
        if abs(iters - round(iters)) < 1e-6 and iters >= 1000:
            text += f" ({round(iters) / 1000:g}K it)"
    return text


def _best(values: Mapping[str, float | None], lower: bool) -> set[str]:
    """The rows holding the best value of a column (all of them on a tie; none when fewer than two values)."""
    present = {k: v for k, v in values.items() if v is not None}
    if len(present) < 2:
        return set()
    best = (min if lower else max)(present.values())
    return {k for k, v in present.items() if v == best}


def _sampler_nfe(sampler: Mapping[str, Any]) -> str:
    """Network evaluations per image of a sampler config (Heun 2N − 1, the others N; guidance doubles them)."""
    steps = int(sampler.get("num_steps") or 0)
    base = 2 * steps - 1 if sampler.get("name") == "heun" else steps
    guided = sampler.get("guidance") not in (None, 1, 1.0)
    if not guided:
        return str(base)
    if sampler.get("guidance_interval"):
        return f"≤ {2 * base} (guidance interval)"
    return str(2 * base)


def _unique(values: Sequence[Any]) -> str:
    items = list(dict.fromkeys(short(v) for v in values if v is not None))
    return items[0] if len(items) == 1 else ("varies: " + ", ".join(items) if items else "?")


def setup_line(configs: Sequence[Mapping[str, Any]], settings: Sequence[Mapping[str, Any]],
               seeds_per_row: Sequence[int], metric: str = "fid") -> str:
    """One line naming the data, model, budget, sampler (NFE), samples per point and feature extractor of a table;
    ``settings``: the curve settings of the table's evaluation variants (what differs is listed as ``varies``)."""
    data = configs[0].get("data", {})
    data_text = f"{data.get('name')} {data.get('resolution')}x{data.get('resolution')}x{data.get('channels')}"
    data_text += ", class-conditional" if data.get("cond") else ", unconditional"
    data_text += ", binarized" if data.get("binarize") else ""
    models = _unique([c.get("model", {}).get("name") for c in configs])
    train = [c.get("train", {}) for c in configs]
    budget = (f"{_unique([t.get('total_kimg') for t in train])} kimg, batch {_unique([t.get('batch') for t in train])}"
              f", lr {_unique([t.get('lr') for t in train])}")
    samplers = [s.get("sampler") or {} for s in settings]
    sampler_text = (f"{_unique([s.get('name') for s in samplers])}, {_unique([s.get('num_steps') for s in samplers])} "
                    f"steps, {_unique([_sampler_nfe(s) for s in samplers])} NFE")
    guidance = [s.get("guidance") for s in samplers if s.get("guidance") not in (None, 1, 1.0)]
    if guidance:
        sampler_text += f", guidance {_unique(guidance)}"
    metric_text = f"{_unique([s.get('num_samples') for s in settings])} samples per point"
    repeats = [int(s.get("seed_repeats") or 1) for s in settings]
    if max(repeats) > 1:
        metric_text += f" (best of {_unique(repeats)} seed ranges)"
    extractors = [_EXTRACTOR_SHORT.get(s["feature_extractor"], s["feature_extractor"]) for s in settings
                  if s.get("feature_extractor")]
    if extractors:
        metric_text += f", {_unique(extractors)}"
    refs = [str(s.get("reference") or "") for s in settings]
    metric_text += ", against " + _unique([r.split(":")[1] if r.startswith("stats:") else "the training split"
                                           for r in refs])
    seed_text = "-".join(str(n) for n in sorted({min(seeds_per_row), max(seeds_per_row)})) if seeds_per_row else "?"
    name = "FID" if metric.startswith("fid_") else f"`{metric}`"
    return (f"Setup: data {data_text}; model {models}; budget {budget}; sampler {sampler_text}; {name}: "
            f"{metric_text}; {seed_text} seed(s) per row. {training_noise_text(configs)}")


def schedule_support(schedule: Mapping[str, Any] | None) -> str:
    """The support of a schedule config's training draws: ``σ ∈ [lo, hi]`` or ``untruncated`` (InfoNoise: its grid
    after the warm-up, and the base's support during it)."""
    schedule = schedule or {}
    rng = schedule.get("sigma_range")
    if rng is None and (schedule.get("sigma_min") is not None or schedule.get("sigma_max") is not None):
        rng = [schedule.get("sigma_min"), schedule.get("sigma_max")]  # the older spelling
    if rng is not None:
        lo, hi = rng
        return f"σ ∈ [{0 if lo is None else lo:g}, {'∞' if hi is None else format(hi, 'g')}]"
    if schedule.get("name") == "infonoise":
        grid = f"[{schedule.get('grid_sigma_min', 0.002):g}, {schedule.get('grid_sigma_max', 80.0):g}]"
        return f"its grid {grid} (warm-up: {schedule_support(schedule.get('base'))})"
    return "untruncated"


def unverified_values(schedule: Mapping[str, Any] | None) -> dict[str, Any]:
    """{parameter: value} of the parameters a schedule config marks ``unverified`` (no readable source fixes them)."""
    schedule = schedule or {}
    return {str(k): schedule.get(k) for k in (schedule.get("unverified") or [])}


def _ema_text(train: Mapping[str, Any]) -> str:
    if train.get("ema", "halflife") == "power":
        rels = list(train.get("ema_sigma_rels") or [])
        return f"power EMA σ_rel {rels[0]:g}" if rels else "power EMA"
    half, ramp = train.get("ema_halflife_kimg"), train.get("ema_rampup_ratio")
    ramp_text = "no ramp-up" if ramp is None else f"ramp-up {ramp:g}"
    return f"half-life {half:g} kimg ({ramp_text})" if half is not None else "?"


def _per_row(configs: Sequence[Mapping[str, Any]], values: Sequence[str]) -> str:
    """One value, or, when the rows differ, the value most runs have and the rows with each other value:
    '<value> (<other value>: <label>, <label>; ...)'."""
    if len(set(values)) <= 1:
        return values[0] if values else "?"
    labels = report_rows(configs)[0]
    usual = max(dict.fromkeys(values), key=values.count)
    others: dict[str, list[str]] = {}
    for lab, val in zip(labels, values):
        if val != usual and lab not in others.setdefault(val, []):
            others[val].append(lab)
    return f"{usual} ({'; '.join(f'{val}: ' + ', '.join(labs) for val, labs in others.items())})"


def training_noise_text(configs: Sequence[Mapping[str, Any]]) -> str:
    """The sentence of the setup line on the training noise and the EMA (module docstring)."""
    schedules = [c.get("schedule") or {} for c in configs]
    train = [c.get("train") or {} for c in configs]
    support = _per_row(configs, [schedule_support(s) for s in schedules])
    convention = _per_row(configs, [
        "λ = 2·ln(σ_data/σ) (data)" if s.get("snr_reference") == "data" else "λ = −2·ln σ (unit)" for s in schedules])
    draws = _per_row(configs, [str(t.get("sigma_draw", "iid")) for t in train])
    ema = _per_row(configs, [_ema_text(t) for t in train])
    return (f"Training noise: support {support}; logSNR {convention}; σ draws {draws}. Evaluated weights: EMA "
            f"{ema}.")


def format_report(report: Mapping[str, Any], plot_name: str | None = "fid_vs_kimg.png") -> str:
    """The Markdown of ``collect_report``'s numbers: per table the metric-vs-kimg table, the final table and the
    images-to-target table, in the papers' layout (rows = settings, published numbers in adjacent columns)."""
    root = Path(report["root"])
    any_paper = any(row.get("paper") for t in report["tables"] for row in t["rows"].values())
    lines = [f"# Report: {root.name}", "",
             f"Sweep `{root}`, {report['time']}. Cells: mean ± sample standard deviation (n − 1) over seeds, with the "
             "number of seeds in parentheses; the best mean per column in bold."
             + (" Paper columns: the published numbers of the preset (the runs' `paper:` config) — comparable only "
                "at the paper's protocol and budget." if any_paper else ""), ""]
    if plot_name:
        lines += [f"![metric vs training kimg]({plot_name})", ""]
    for table in report["tables"]:
        lines += [f"## {table['title']}", ""]
        for variant in table["variants"]:
            lines += _kimg_table(table, variant)
        lines += _final_table(table)
        for variant in table["variants"]:
            if variant["target"] is not None:
                lines += _target_table(table, variant, report["target_fid"])
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def _row_cells(table: Mapping[str, Any], lab: str) -> list[str]:
    """The label cells of a row: one per label column of the table (or the row label itself); the first one marked
    † when the row's schedule has unverified parameters."""
    cells = [lab] if not table["columns"] else [table["rows"][lab]["aspects"].get(c, lab) for c in table["columns"]]
    if table["rows"][lab].get("unverified"):
        cells[0] = f"{cells[0]} {UNVERIFIED_MARK}"
    return cells


def _unverified_note(table: Mapping[str, Any]) -> list[str]:
    """The footnote of the rows marked †: their unverified parameters and the values they trained with."""
    marked = {lab: table["rows"][lab]["unverified"] for lab in table["order"] if table["rows"][lab].get("unverified")}
    if not marked:
        return []
    parts = [f"{lab}: " + ", ".join(f"{k} = {short(v)}" for k, v in values.items()) for lab, values in marked.items()]
    return [f"{UNVERIFIED_MARK} Parameters no readable source fixes (our choice, marked `unverified` in the schedule's "
            f"config; sweep them to check): {'; '.join(parts)}.", ""]


def _kimg_table(table: Mapping[str, Any], variant: Mapping[str, Any]) -> list[str]:
    """Metric vs kimg of one evaluation variant, the paper's numbers (``fid_by_kimg``) beside their kimg."""
    vrows = variant["rows"]
    suffix = f" — {variant['label']}" if variant["label"] else ""
    head = [f"### `{variant['metric']}` vs training kimg{suffix}", "", variant["setup"], ""]
    paper_kimgs = sorted({k for r in vrows.values() for k in r["paper_by_kimg"]})
    kimgs = sorted(set(variant["kimg"]) | set(paper_kimgs))
    header = list(table["columns"] or ["row"])
    for k in kimgs:
        header.append(kimg_header(k, table["batch"]))
        if k in paper_kimgs:
            header.append("paper")
    body = []
    bests = {k: _best({lab: (r["cells"][k]["mean"] if k in r["cells"] else None) for lab, r in vrows.items()},
                      variant["lower_is_better"]) for k in kimgs}
    for lab, r in vrows.items():
        cells = _row_cells(table, lab)
        for k in kimgs:
            cells.append(fmt_stat(r["cells"].get(k), bold=lab in bests[k]))
            if k in paper_kimgs:
                cells.append(_fmt_paper(r["paper_by_kimg"].get(k)))
        body.append(cells)
    return head + _md_table(header, body) + [""]


def _final_table(table: Mapping[str, Any]) -> list[str]:
    """Final values: one column (and its paper column) per variant, then the ``eval-*.json`` metrics."""
    lines = ["### Final", "", table["setup"], ""]
    header = list(table["columns"] or ["row"]) + ["final kimg"]
    has_paper = [any(r["paper_final"] is not None for r in v["rows"].values()) for v in table["variants"]]
    for variant, paper in zip(table["variants"], has_paper):
        header.append(f"`{variant['metric']}`" + (f" ({variant['label']})" if variant["label"] else ""))
        if paper:
            header.append("paper")
    extra_cols = list(table["extras"])
    header += extra_cols
    body = []
    for lab in table["order"]:
        cells = _row_cells(table, lab)
        finals = [v["rows"].get(lab, {}).get("final_kimg") for v in table["variants"]]
        cells.append(" / ".join(dict.fromkeys(report_kimg(k) for k in finals if k is not None)) or "—")
        for variant, paper in zip(table["variants"], has_paper):
            r = variant["rows"].get(lab)
            best = _best({lb: (vr["final"]["mean"] if vr["final"] else None)
                          for lb, vr in variant["rows"].items()}, variant["lower_is_better"])
            cells.append(fmt_stat(r["final"] if r else None, bold=lab in best))
            if paper:
                cells.append(_fmt_paper(r["paper_final"] if r else None))
        for col in extra_cols:
            cells.append(fmt_stat(table["extras"][col].get(lab)))
        body.append(cells)
    lines += _md_table(header, body) + [""] + _unverified_note(table)
    sources = list(dict.fromkeys(str(table["rows"][lab]["paper"]["source"]) for lab in table["order"]
                                 if table["rows"][lab]["paper"] and table["rows"][lab]["paper"].get("source")))
    if sources:
        lines += ["Paper numbers: " + _join_sources(sources) + ".", ""]
    return lines


def _target_table(table: Mapping[str, Any], variant: Mapping[str, Any], target_fid: Any) -> list[str]:
    """Training images to reach the target, per row: the seed-mean curve's crossing, the per-seed ones and the
    speed-up over the baseline row."""
    summary = variant["target"]
    suffix = f" — {variant['label']}" if variant["label"] else ""
    base = summary["baseline"]
    how = {"loglinear": "log value linear in kimg between checkpoints", "linear": "linear between checkpoints",
           "none": "first checkpoint at or below it"}[summary["interpolation"]]
    source = ("eval.target_fid" if target_fid is not None else
              f"the final seed-mean value of the baseline row '{base}'" if base else
              "the largest of the rows' best seed-mean values (every row reaches it)")
    lines = [f"### Training images to reach `{variant['metric']}` ≤ {summary['target']:.4g}{suffix}", "",
             variant["setup"], "",
             f"Target {summary['target']:.4g}: {source}. kimg at which the seed-mean curve "
             f"first reaches it ({how}; '≤': already at the first checkpoint); per seed: the same for each "
             "seed's curve, mean ± std over the seeds that reach it (reached/n). Speed-up: baseline kimg / "
             "row kimg" + (f" (baseline: {base})." if base else " (no baseline row: set "
                           "eval.baseline_run=<row label>)."), ""]
    paper_col = any(r.get("target", {}).get("paper_speedup") for r in variant["rows"].values())
    header = list(table["columns"] or ["row"]) + ["final kimg", "final (seed mean)", "kimg to target", "per seed",
                                                  "speed-up"] + (["paper speed-up"] if paper_col else [])
    body = []
    for lab, r in variant["rows"].items():
        t = r.get("target") or {}
        cells = _row_cells(table, lab)
        cells[0] = cells[0] + (" (baseline)" if lab == base else "")
        kimg = t.get("kimg")
        reach = "not reached" if kimg is None else (("≤ " if t.get("at_first_checkpoint") else "") + fmt_kimg(kimg))
        per_seed = t.get("per_seed")
        per_seed_text = "—" if per_seed is None else fmt_stat(per_seed).rsplit(" (", 1)[0]
        per_seed_text += f" ({t.get('reached', 0)}/{len(t.get('per_seed_kimg', []))})"
        speed = f"{t['speedup']:.2f}x" if t.get("speedup") else "—"
        cells += [report_kimg(r["final_kimg"]) if r["final_kimg"] is not None else "—",
                  f"{r['final']['mean']:.4g}" if r["final"] else "—", reach, per_seed_text, speed]
        if paper_col:
            cells.append(t.get("paper_speedup") or "—")
        body.append(cells)
    return lines + _md_table(header, body) + [""]


def _join_sources(sources: Sequence[str]) -> str:
    """``A, row "x"; A, row "y"`` -> ``A, rows "x", "y"`` (the presets' ``paper.source`` strings)."""
    parts = [src.rsplit(", row ", 1) for src in sources]
    if len(sources) > 1 and all(len(p) == 2 for p in parts) and len({p[0] for p in parts}) == 1:
        return f"{parts[0][0]}, rows " + ", ".join(p[1] for p in parts)
    return "; ".join(sources)


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    esc = [[str(c).replace("|", "\\|") for c in row] for row in [header, *body]]
    return ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                           for r in esc[1:]]
