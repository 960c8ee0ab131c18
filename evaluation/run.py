"""What ``evaluate.py`` does with its composed config (``configs/evaluate.yaml``): one of five modes.

- ``samples=<npz | image folder>``: the metrics of given images (``load_samples``) against the training split.
- ``ckpt=<run dir | checkpoint | .safetensors>``: sample the model (``evaluation/protocol.py``: seeds, repeats,
  baselines, ranks) and compute ``eval.metrics``, the likelihood included (``evaluation/likelihood.py``).
- ``run_dir=<run or sweep dir>``: FID-vs-kimg curves of every checkpoint (``evaluation/curves.py``); with
  ``eval.checkpoints=last`` (``eval=nll``) each run's newest checkpoint as ``ckpt=`` does, into
  ``<run>/eval-<eval.name>.json``.
- ``ref=true``: reference statistics of the training split in EDM's format (``evaluation/reference_stats.py``).
- ``report=<sweep dir | schedules | infonoise>``: the sweep report (``evaluation/report.py``), the schedules figure
  (``evaluation/schedule_figure.py``) or the InfoNoise profiles (``evaluation/infonoise_report.py``).

Before any sampling or feature extraction, every mode but ``report=`` runs the preflight (``evaluation/preflight.py``:
weights, reference files, data, output path), and all of them run on ``device=``.

``samples=`` and ``ckpt=`` print a table (one column per image set: samples, the floor and ceiling baselines, the
seed ranges) and write the record to ``out=`` (default: ``eval-<eval.name>.json`` beside the checkpoint or the
samples). The record says what was evaluated and how: ``checkpoint`` (the file, the training images it had seen
``cur_nimg``, its step, EMA or raw weights), ``num_samples`` beside ``metrics`` (and ``counts`` beside ``columns``),
``seeds``, the ``sampler`` config with ``nfe`` (network evaluations per image) and ``num_steps``, the feature
extractor with its weights file and id, and the reference; for ``samples=`` written by sample.py, ``generated_by``
repeats its ``samples.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from configs import jsonable, to_plain_dict
from data.atomic import atomic_write_text
from evaluation.curves import CHECKPOINT_CHOICES, find_runs, run_curves, run_last_checkpoints, run_name
from evaluation.digits_classifier import load_or_train_digits_classifier
from evaluation.features import resolve_feature_extractor
from evaluation.infonoise_report import plot_infonoise_profile
from evaluation.likelihood import format_likelihood
from evaluation.metrics import compute_metrics, load_samples
from evaluation.posthoc import check_ema_mode, load_eval_denoiser, out_suffix, run_ema_sweep
from evaluation.preflight import PreflightResult, check_evaluation, check_reference_job, on_main_rank
from evaluation.protocol import CEILING_NOTE, evaluate_model, floor_columns, reference_getter
from evaluation.provenance import checkpoint_info, checkpoint_record, samples_metadata
from evaluation.reference_stats import compute_reference_statistics, reference_identity, save_reference_statistics
from evaluation.report import report_selection, sweep_report
from evaluation.schedule_figure import write_schedule_report
from evaluation.settings import (
    DIGITS_EXTRACTOR,
    EXTRACTOR_DESCRIPTIONS,
    EXTRACTOR_TAGS,
    INCEPTION_EXTRACTOR,
    check_metrics,
    eval_settings,
    run_group,
    safe_name,
)
from evaluation.sweep import find_report_runs, run_config
from training.checkpoint import list_checkpoints
from training.distributed import resolve_device

__all__ = ["run_evaluation", "run_reference", "run_report", "format_table"]


def _modes(cfg: Any) -> dict[str, bool]:
    return {"samples": cfg.get("samples") is not None, "ckpt": cfg.get("ckpt") is not None,
            "run_dir": cfg.get("run_dir") is not None, "ref": bool(cfg.get("ref", False)),
            "report": cfg.get("report") is not None}


def _device(cfg: Any, dist_info: Any) -> Any:
    """``device=`` (under torchrun: this rank's device, chosen by ``init_distributed`` from ``device=``)."""
    return dist_info.device if dist_info is not None else resolve_device(str(cfg.get("device", "auto")))


def run_evaluation(cfg: Any, overrides: Sequence[str] = (), dist_info: Any = None) -> dict[str, Any]:
    """The CLI's work on a composed ``configs/evaluate.yaml`` config; returns the record written to JSON.

    ``overrides`` are the command-line overrides: with ``ckpt`` (and ``run_dir``), the run's own ``data`` and
    ``sampler`` groups are used unless the command line chose another option (``data=...``) or set keys
    (``data.path=...``). ``dist_info`` (``training.distributed.init_distributed``): split sampling over the ranks;
    rank 0 computes the metrics and returns the record, the other ranks return ``{}``.
    """
    if cfg.get("ema_sweep") is not None:  # metric against post-hoc EMA length (evaluation/posthoc.py)
        return run_ema_sweep(cfg, overrides, dist_info)
    check_ema_mode(cfg)
    modes = _modes(cfg)
    if modes["report"]:
        return run_report(cfg, overrides, dist_info)
    if sum(modes.values()) != 1:
        raise ValueError("give exactly one of samples=<npz or image folder>, ckpt=<checkpoint or run dir>, "
                         "run_dir=<run or sweep dir> (FID curves), ref=true (reference statistics) or "
                         "report=<sweep dir | schedules | infonoise> (got "
                         f"samples={cfg.get('samples')!r}, ckpt={cfg.get('ckpt')!r}, run_dir={cfg.get('run_dir')!r}, "
                         f"ref={cfg.get('ref', False)!r})")
    settings = eval_settings(cfg.eval)
    metrics = check_metrics(settings["metrics"])
    if modes["ref"]:
        return run_reference(cfg, dist_info)
    if modes["run_dir"]:
        checkpoints = str(settings.get("checkpoints", "all"))
        if checkpoints not in CHECKPOINT_CHOICES:
            raise ValueError(f"unknown eval.checkpoints {checkpoints!r}; valid: {', '.join(CHECKPOINT_CHOICES)} (all: "
                             "a curve of every checkpoint; last: each run's newest, as eval-<eval.name>.json)")
        if checkpoints == "last":  # each run's newest checkpoint, as ckpt= would (eval=nll)
            return run_last_checkpoints(cfg, overrides, dist_info, lambda c: run_evaluation(c, overrides, dist_info))
        _preflight_runs(cfg, overrides, settings, dist_info)
        return run_curves(cfg, overrides, dist_info)
    device = _device(cfg, dist_info)
    t0 = time.time()
    if cfg.ckpt is not None:
        done = _evaluate_checkpoint(cfg, overrides, settings, metrics, device, dist_info)
    else:
        done = _evaluate_samples(cfg, settings, metrics, device, dist_info)
    if done is None:  # a rank other than 0
        return {}
    result, data_cfg, sampler_cfg, preflight, source = done
    _print_result(result, preflight)
    extractor = result["extractor"]
    record = {
        "metrics": result["metrics"],
        "num_samples": result["num_samples"],
        "feature_extractor": extractor,
        "feature_extractor_description": EXTRACTOR_DESCRIPTIONS.get(extractor) if extractor else None,
        **{k: v for k, v in preflight.record().items() if k != "feature_extractor"},
        "reference": preflight.reference,
        "columns": result["columns"],
        "counts": result["counts"],
        "notes": result["notes"],
        "data": to_plain_dict(data_cfg),
        "sampler": to_plain_dict(sampler_cfg) if sampler_cfg is not None else None,
        "eval": dict(settings),
        **source,
        "device": str(device),
        "world_size": 1 if dist_info is None else dist_info.world_size,
        "seconds": round(time.time() - t0, 2),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if extractor == DIGITS_EXTRACTOR:  # the classifier's provenance and held-out accuracy (already cached)
        cache_dir = os.path.expanduser(str(settings["cache_dir"]))
        record["classifier"] = load_or_train_digits_classifier(data_cfg, cache_dir)[1]
    _write_record(cfg, record, result, settings)
    return record


def _preflight_runs(cfg: Any, overrides: Sequence[str], settings: dict[str, Any], dist_info: Any) -> None:
    """``run_dir=``: the preflight of every run's evaluation (once per distinct data set), before any sampling."""
    def check() -> None:
        seen: set[str] = set()
        for run in find_runs(os.path.expanduser(str(cfg.run_dir))):
            if not list_checkpoints(run):
                continue  # nothing to evaluate there (the curves say so)
            info = checkpoint_info(list_checkpoints(run)[-1])
            data_cfg = run_group(OmegaConf.create(info["config"]).get("data"), cfg.data, overrides, "data")
            identity = reference_identity(data_cfg, "train")
            if identity not in seen:
                seen.add(identity)
                check_evaluation(settings, data_cfg, get_reference=reference_getter(data_cfg, settings),
                                 chw=_generated_shape(info), num_samples=int(settings["num_samples"]))

    on_main_rank(check, dist_info is not None)


def _generated_shape(info: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """(C, H, W) of a checkpoint's samples; None for a latent-space model (decoded by its VAE after sampling)."""
    geometry = info["geometry"]
    if geometry.get("latent_info"):
        return None
    return int(geometry["img_channels"]), int(geometry["img_resolution"]), int(geometry["img_resolution"])


def _evaluate_checkpoint(cfg: Any, overrides: Sequence[str], settings: dict[str, Any], metrics: Sequence[str],
                         device: Any, dist_info: Any) -> tuple | None:
    """``ckpt=``: (result, data config, sampler config, preflight, source record) on rank 0, else None."""
    if not os.path.exists(str(cfg.ckpt)):
        raise FileNotFoundError(f"ckpt not found: {cfg.ckpt}")
    info = checkpoint_info(str(cfg.ckpt))
    run_cfg = OmegaConf.create(info["config"])
    data_cfg = run_group(run_cfg.get("data"), cfg.data, overrides, "data")
    sampler_cfg = run_group(run_cfg.get("sampler"), cfg.sampler, overrides, "sampler")
    get_reference = reference_getter(data_cfg, settings)
    preflight = on_main_rank(lambda: check_evaluation(
        settings, data_cfg, get_reference=get_reference, chw=_generated_shape(info),
        num_samples=int(settings["num_samples"]), out=_out_path(cfg, settings)), dist_info is not None)
    denoiser, _, ema = load_eval_denoiser(cfg, info["path"], device)  # ema.sigma_rel=: a post-hoc EMA
    out = _out_path(cfg, settings)
    result = evaluate_model(denoiser, data_cfg, sampler_cfg, settings, device=device, get_reference=get_reference,
                            distributed=dist_info is not None, progress=True, run_cfg=run_cfg,
                            samples_path=out.with_name(out.stem + "-samples.npz"))
    if result is None:
        return None
    source = {"ckpt": str(cfg.ckpt), "checkpoint": checkpoint_record(info, ema), "ema": ema,
              "seeds": result["seeds"], "nfe": result["nfe"], "num_steps": result["num_steps"]}
    if result["likelihood"] is not None:
        source["likelihood"] = result["likelihood"]
    if len(result["repeats"]) > 1:
        source["repeats"] = [{"seeds": r["seeds"], "num_samples": r["num_images"], "metrics": r["metrics"]}
                             for r in result["repeats"]]
    return result, data_cfg, sampler_cfg, preflight, source


def _evaluate_samples(cfg: Any, settings: dict[str, Any], metrics: Sequence[str], device: Any,
                      dist_info: Any) -> tuple | None:
    """``samples=``: (result, data config, None, preflight, source record) on rank 0, else None."""
    if "nll" in metrics:
        raise ValueError("eval.metrics contains nll, which needs the model: evaluate it with ckpt=<run>")
    if int(settings["seed_repeats"]) != 1:
        raise ValueError("eval.seed_repeats needs ckpt=<run> (the images of samples= come with their seeds)")
    if dist_info is not None and dist_info.rank != 0:
        return None
    data_cfg = cfg.data
    get_reference = reference_getter(data_cfg, settings)
    if not Path(os.path.expanduser(str(cfg.samples))).exists():
        raise FileNotFoundError(f"samples path not found: {cfg.samples}")
    preflight = check_evaluation(settings, data_cfg, get_reference=get_reference, out=_out_path(cfg, settings))
    reference = get_reference()
    ref_chw = None if reference is None else (reference.num_channels, reference.resolution, reference.resolution)
    images = load_samples(str(cfg.samples), ref_chw)
    extractor = resolve_feature_extractor(settings["feature_extractor"], data_cfg)
    common = dict(metrics=[m for m in metrics if m != "nll"], feature_extractor=extractor,
                  reference_cache_name=reference_identity(data_cfg, "train"), eval_cfg=settings, data_cfg=data_cfg,
                  device=device)
    progress = bool(settings.get("progress", True))
    result = {"columns": {"samples": compute_metrics(images, reference, progress=progress, **common)},
              "counts": {"samples": len(images)}, "notes": [], "extractor": extractor, "images": images,
              "num_samples": len(images), "likelihood": None}
    result["metrics"] = result["columns"]["samples"]
    if settings["baselines"]:
        columns, counts = floor_columns(images, data_cfg, common, get_reference, result["notes"])
        result["columns"].update(columns)
        result["counts"].update(counts)
        result["notes"].append(CEILING_NOTE)
    return result, data_cfg, None, preflight, {"samples": str(cfg.samples),
                                                "generated_by": samples_metadata(str(cfg.samples))}


def _print_result(result: Mapping[str, Any], preflight: PreflightResult) -> None:
    """Print the reference, the table (with its sample counts), the likelihood and the notes."""
    extractor = result["extractor"]
    reference = preflight.reference
    if extractor is not None and reference is not None:
        if "stats" in reference:
            print(f"reference: statistics from {reference['stats']}")
        else:
            print(f"reference: '{reference['dataset']}' training split ({reference['num_images']} images)")
        print(format_table(result["columns"], result["counts"], extractor))
    if result["likelihood"] is not None:
        print(format_likelihood(result["metrics"], result["likelihood"]))
    for note in result["notes"]:
        print(note)


def _out_path(cfg: Any, settings: Mapping[str, Any]) -> Path:
    """Where the record goes: ``out=``, else ``_default_out``."""
    return Path(os.path.expanduser(str(cfg.out))) if cfg.get("out") else _default_out(cfg, str(settings["name"]))


def _write_record(cfg: Any, record: dict[str, Any], result: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """Write the record (atomically); ``eval.save_samples``' file was streamed while sampling (``samples_file``)."""
    out = _out_path(cfg, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    if result.get("samples_file"):  # written while sampling (evaluation/samples_file.py), streamed chunk by chunk
        record["samples_file"] = result["samples_file"]
    atomic_write_text(out, json.dumps(jsonable(record), indent=2, allow_nan=False) + "\n")
    print(f"wrote {out}")


def _default_out(cfg: Any, eval_name: str) -> Path:
    if cfg.ckpt is not None:
        ckpt = Path(str(cfg.ckpt))
        if ckpt.is_dir():
            return ckpt / f"eval-{eval_name}{out_suffix(cfg)}.json"
        return ckpt.parent / f"eval-{eval_name}-{ckpt.stem}{out_suffix(cfg)}.json"
    samples = Path(str(cfg.samples))
    stem = samples.stem if samples.is_file() else samples.name
    return samples.parent / f"eval-{eval_name}-{stem}.json"


def _metric_label(key: str, extractor: str | None) -> str:
    if key.startswith("nll_"):
        return {"nll_ode_bpd": "NLL, ODE (bits/dim)", "nll_elbo_bpd": "NLL bound, ELBO (bits/dim)"}.get(key, key)
    if key == "fd_dinov2":
        return "FD-DINOv2"
    prefix = "classifier-" if extractor == DIGITS_EXTRACTOR else ""
    names = {"fid": "FID", "isc": "IS", "kid": "KID"}
    metric = key.split("_", 1)[0]
    tag = EXTRACTOR_TAGS[extractor]
    rest = key[len(metric) + 1 + len(tag):].lstrip("_")
    if metric == "prc":
        return f"{prefix}{rest}"
    return f"{prefix}{names[metric]}" + (f" ({rest})" if rest else "")


def format_table(columns: Mapping[str, Mapping[str, float]], counts: Mapping[str, int], extractor: str) -> str:
    """An aligned text table: one column per image set (samples, floor, ...), one row per metric key."""
    keys = list(dict.fromkeys(k for col in columns.values() for k in col))
    label_w = max([len("images")] + [len(_metric_label(k, extractor)) for k in keys])
    widths = {name: max(len(name), 10) for name in columns}

    def fmt(v: float | None) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"

    lines = [f"metric: {EXTRACTOR_DESCRIPTIONS[extractor]}"]
    lines.append("  ".join([" " * label_w] + [name.rjust(widths[name]) for name in columns]))
    lines.append("  ".join(["images".ljust(label_w)] + [str(counts.get(n, "-")).rjust(widths[n]) for n in columns]))
    for k in keys:
        cells = [fmt(columns[n].get(k)).rjust(widths[n]) for n in columns]
        lines.append("  ".join([_metric_label(k, extractor).ljust(label_w)] + cells))
    return "\n".join(lines)


def run_reference(cfg: Any, dist_info: Any = None) -> dict[str, Any]:
    """``ref=true``: μ, Σ of every (un-flipped) training image of ``data`` in EDM's ``.npz`` format (rank 0 only)."""
    if dist_info is not None and dist_info.rank != 0:
        return {}
    settings = eval_settings(cfg.eval)
    device = _device(cfg, dist_info)
    extractor = resolve_feature_extractor(settings["feature_extractor"], cfg.data)
    out = Path(os.path.expanduser(str(cfg.out))) if cfg.get("out") else None
    preflight = check_reference_job(settings, cfg.data, extractor, out)
    dataset = preflight.pop("dataset")
    if out is None:
        suffix = "" if extractor == INCEPTION_EXTRACTOR else f"-{EXTRACTOR_TAGS[extractor]}"
        out = Path(f"{dataset.name}-{dataset.resolution}x{dataset.resolution}{suffix}.npz")
    t0 = time.time()
    stats = compute_reference_statistics(dataset, feature_extractor=extractor, eval_cfg=settings, data_cfg=cfg.data,
                                         device=device)
    save_reference_statistics(out, stats)
    print(f"reference statistics of '{dataset.name}' (training split, {stats['num_images']} images, "
          f"{EXTRACTOR_DESCRIPTIONS[extractor]}) -> {out}  [{time.time() - t0:.1f} s]")
    return {"path": str(out), "num_images": stats["num_images"], "feature_extractor": extractor,
            "extractor_id": stats["extractor_id"], "device": str(device), **preflight}


def run_report(cfg: Any, overrides: Sequence[str] = (), dist_info: Any = None) -> dict[str, Any]:
    """The CLI's ``report=``: ``<sweep dir>`` (tables), ``schedules`` (the schedules figure) or ``infonoise``
    (with ``run_dir=``: InfoNoise profiles). ``out=``: the output directory (or .png for one InfoNoise run)."""
    if dist_info is not None and dist_info.rank != 0:
        return {}
    what = str(cfg.report)
    others = sorted(k for k, on in _modes(cfg).items() if on and k != "report")
    out = cfg.get("out")
    if what == "infonoise":
        if cfg.get("run_dir") is None or others != ["run_dir"]:
            raise ValueError("report=infonoise needs run_dir=<InfoNoise run or sweep dir> and none of samples=, "
                             f"ckpt=, ref= (got {', '.join(others) or 'no run_dir'})")
        return _infonoise_reports(Path(os.path.expanduser(str(cfg.run_dir))), None if out is None else str(out))
    if others:
        raise ValueError(f"report={what} is a mode of its own: drop {', '.join(others)}= (run_dir= goes only with "
                         "report=infonoise; the sweep report reads the curves `evaluate.py run_dir=<sweep>` wrote)")
    if what == "schedules":
        paths = write_schedule_report(Path(str(out)) if out else Path("docs") / "figures")
        print("wrote " + ", ".join(str(p) for p in (paths.values() if isinstance(paths, Mapping) else paths)))
        return {"report": "schedules",
                "files": {k: str(v) for k, v in paths.items()} if isinstance(paths, Mapping) else paths}
    return sweep_report(what, out_dir=out, eval_cfg=cfg.get("eval"), select=report_selection(cfg, overrides))


def _infonoise_reports(run_dir: Path, out: str | None) -> dict[str, Any]:
    """``report=infonoise run_dir=<run or sweep>``: the InfoNoise profile figure of every InfoNoise run."""
    runs = [r for r in find_report_runs(run_dir)
            if (run_config(r).get("schedule") or {}).get("name") == "infonoise"]
    if not runs:
        raise ValueError(f"report=infonoise: no InfoNoise run (schedule=infonoise) at or below {run_dir}")
    written = []
    for run in runs:
        if out is None:
            target = None
        elif len(runs) == 1 and str(out).endswith(".png"):
            target = Path(out)
        else:
            Path(out).mkdir(parents=True, exist_ok=True)
            target = Path(out) / f"infonoise_profile-{safe_name(run_name(run, run_dir))}.png"
        written.append(str(plot_infonoise_profile(run, target)))
        print(f"wrote {written[-1]}")
    return {"report": "infonoise", "files": written}
