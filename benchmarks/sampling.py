"""Sampler benchmark: speed (images/s) and quality (FID) versus NFE for every sampler, on one trained checkpoint.

    python benchmarks/sampling.py --ckpt runs/<digits run> [--samplers heun,euler,ddim,dpmpp_2m,euler_ancestral]
        [--nfe 5,9,17,35] [--num 2000] [--batch 500] [--device auto] [--set steps_from=loglinear] [--out DIR]

For each sampler and each target NFE the step count is chosen to spend that many network evaluations (Heun: N steps
cost 2N − 1, so N = (NFE + 1)/2; the others N = NFE); the NFE reported is the one counted while sampling
(``sample.generate_images(info=...)``). Every configuration samples the same seeds 0..num−1 with per-image noise, so
differences are the samplers', not the noise's. Quality is the FID of ``evaluation.metrics.compute_metrics`` against
the run's training set (for digits: the digits-classifier features, selected by ``feature_extractor=auto``); pass
``--no-fid`` (or run without the ``evaluation`` package) for speed only. Speed is measured after one warm-up batch,
with the device synchronised, and excludes the FID computation.

Writes ``<out>/results.json``, ``<out>/results.md`` (the table) and ``<out>/sampling.png`` (FID and images/s vs NFE).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from diffusion.samplers import SAMPLERS  # noqa: E402

SAMPLER_CONFIGS = ROOT / "configs" / "sampler"


def steps_for_nfe(name: str, nfe: int) -> int:
    """Steps that spend ``nfe`` network evaluations (Heun: 2N − 1; the rest: N)."""
    return max(1, (nfe + 1) // 2) if name == "heun" else max(1, nfe)


def sampler_config(name: str, num_steps: int, overrides: list[str]) -> Any:
    path = SAMPLER_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        valid = ", ".join(sorted(p.stem for p in SAMPLER_CONFIGS.glob("*.yaml")))
        raise ValueError(f"unknown sampler '{name}'; valid: {valid}")
    cfg = OmegaConf.load(path)
    cfg.num_steps = num_steps
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        if key not in cfg:
            raise ValueError(f"--set {key}: sampler={name} has no key '{key}'; keys: {', '.join(cfg.keys())}")
        cfg[key] = yaml.safe_load(value)  # numbers, null, .inf, [lo, hi] lists, strings
    return cfg


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _metrics_backend() -> tuple[Any, str | None]:
    """The evaluation functions the benchmark needs (``compute_metrics``, ``reference_identity``), or a note."""
    try:
        from evaluation.metrics import compute_metrics
        from evaluation.reference_stats import reference_identity

        return SimpleNamespace(compute_metrics=compute_metrics, reference_identity=reference_identity), None
    except Exception as err:  # noqa: BLE001 - any import problem means "no FID", reported in the table
        return None, f"FID not computed: the evaluation package could not be imported ({type(err).__name__}: {err})"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from data import build_dataset
    from training.checkpoint import load_denoiser, resolve_checkpoint
    from training.distributed import resolve_device
    from training.generate import generate_images

    device = torch.device(resolve_device(args.device))
    ckpt = resolve_checkpoint(args.ckpt)
    denoiser, run_cfg = load_denoiser(ckpt, ema=not args.raw, device=device)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        raise ValueError(f"unknown sampler(s) {', '.join(unknown)}; valid: {', '.join(sorted(SAMPLERS))}")
    nfes = sorted({int(n) for n in args.nfe.split(",")})
    seeds = list(range(args.num))
    binary = bool(run_cfg.data.get("binarize", False))

    evaluate, note = (None, "FID not computed (--no-fid)") if args.no_fid else _metrics_backend()
    reference = None
    if evaluate is not None:
        reference = build_dataset(run_cfg.data, split="train")

    rows = []
    for name in samplers:
        for target in nfes:
            cfg = sampler_config(name, steps_for_nfe(name, target), args.set)
            generate_images(denoiser, seeds[:args.batch], sampler_cfg=cfg, batch_size=args.batch, device=device,
                            binary=binary)  # warm-up (kernels, allocator)
            info: dict[str, Any] = {}
            _synchronize(device)
            t0 = time.perf_counter()
            images = generate_images(denoiser, seeds, sampler_cfg=cfg, batch_size=args.batch, device=device,
                                     binary=binary, info=info)
            _synchronize(device)
            seconds = time.perf_counter() - t0
            row = {"sampler": name, "num_steps": int(cfg.num_steps), "nfe": info["nfe"],
                   "images_per_s": len(images) / seconds, "seconds": seconds, "fid": None}
            if evaluate is not None:
                metrics = evaluate.compute_metrics(
                    images, reference, metrics=("fid",), feature_extractor="auto",
                    reference_cache_name=evaluate.reference_identity(run_cfg.data, "train"),
                    data_cfg=run_cfg.data, device=device)
                row["fid"] = next(v for k, v in metrics.items() if k.startswith("fid"))
                row["fid_key"] = next(k for k in metrics if k.startswith("fid"))
            rows.append(row)
            fid = "—" if row["fid"] is None else f"{row['fid']:.3f}"
            print(f"{name:16s} steps {row['num_steps']:4d}  NFE {row['nfe']:>5}  {row['images_per_s']:9.1f} img/s  "
                  f"FID {fid}", flush=True)

    result = {"ckpt": str(ckpt), "ema": not args.raw, "num_images": args.num, "batch": args.batch,
              "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "overrides": args.set, "note": note, "rows": rows}
    out = Path(args.out) if args.out else Path(ckpt).parent.parent / "benchmarks" / "sampling"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = format_table(result)
    (out / "results.md").write_text(table + "\n")
    plot(rows, out / "sampling.png")
    print("\n" + table)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'sampling.png'}")
    return result


def format_table(result: dict[str, Any]) -> str:
    fid_key = next((r.get("fid_key") for r in result["rows"] if r.get("fid_key")), "fid")
    lines = [f"Sampler benchmark: {result['ckpt']} ({'EMA' if result['ema'] else 'raw'} weights), "
             f"{result['num_images']} images, batch {result['batch']}, {result['device_name']}"
             + (f", overrides {' '.join(result['overrides'])}" if result["overrides"] else ""),
             "",
             f"| sampler | steps | NFE | images/s | {fid_key} |",
             "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        fid = "—" if r["fid"] is None else f"{r['fid']:.3f}"
        lines.append(f"| {r['sampler']} | {r['num_steps']} | {r['nfe']} | {r['images_per_s']:.1f} | {fid} |")
    if result["note"]:
        lines += ["", result["note"]]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_fid = any(r["fid"] is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_fid else 1, figsize=(10 if has_fid else 5, 4), squeeze=False)
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    for name in names:
        mine = [r for r in rows if r["sampler"] == name]
        nfe = [r["nfe"] for r in mine]
        axes[0][-1].plot(nfe, [r["images_per_s"] for r in mine], marker="o", label=name)
        if has_fid:
            fid = [math.nan if r["fid"] is None else r["fid"] for r in mine]
            axes[0][0].plot(nfe, fid, marker="o", label=name)
    if has_fid:
        axes[0][0].set(xscale="log", yscale="log", xlabel="NFE", ylabel="FID", title="quality vs NFE")
        axes[0][0].legend()
    axes[0][-1].set(xscale="log", yscale="log", xlabel="NFE", ylabel="images/s", title="speed vs NFE")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint file or run directory (its newest checkpoint)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated sampler names")
    parser.add_argument("--nfe", default="5,9,17,35", help="comma-separated target NFEs")
    parser.add_argument("--num", type=int, default=2000, help="images per configuration (seeds 0..num-1)")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--raw", action="store_true", help="use the raw training weights instead of the EMA")
    parser.add_argument("--no-fid", action="store_true", help="measure speed only")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="sampler config override applied to every sampler (e.g. steps_from=loglinear)")
    parser.add_argument("--out", default=None, help="output directory (default: <run dir>/benchmarks/sampling)")
    args = parser.parse_args(argv)
    if args.num < 2 or args.batch < 1:
        parser.error("--num must be >= 2 and --batch >= 1")
    return run(args)


if __name__ == "__main__":
    main()
