"""Training-step throughput and peak memory per model x precision x compile, as ratios to fp32 eager; DDP scaling.

The step timed is the real one (``training.trainer.Trainer.train_step``); every ratio is against the plain fp32 eager
step measured in the same run, and ``--ddp`` adds the scaling efficiency of 1 vs 2 processes.

    python benchmarks/train_step.py                                   # CPU: unet_tiny on digits, fp32/bf16, eager
    python benchmarks/train_step.py --models unet_tiny,ddpmpp --precisions fp32,bf16,fp16 --compile both
    python benchmarks/train_step.py --ddp                             # + 1 vs 2 processes (gloo on CPU, NCCL on GPU)
    python benchmarks/train_step.py --json out.json

Each row builds ``training.trainer.Trainer`` from the real configs (``--set key=value`` adds overrides, e.g.
``--set data=cifar10 --set data.path=...``), warms up, then times ``Trainer.train_step`` — data loading, σ and noise
draws, forward, backward, the optimizer and the EMA — over ``--steps`` steps, median of ``--repeats`` blocks. The
first row of each model (fp32, eager) is its baseline; every other row prints its speed and memory relative to it.
Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the growth of the peak resident set size of a fresh
subprocess per row (an upper bound). MFU (GPU only): achieved FLOP/s (3 x forward FLOPs per image, the usual
forward + backward estimate, from ``models.flops.count_flops``) over the device's dense bf16/fp16 peak given by
``--peak-tflops``.

Timings are only comparable within one run on one otherwise idle machine: that is why everything is a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def measure(model: str, precision: str, compile_: bool, batch: int, steps: int, repeats: int, device: str,
            extra: list[str]) -> dict:
    """Time the training step of one configuration in this process."""
    import torch

    from training.distributed import init_distributed
    from training.trainer import Trainer

    overrides = [f"model={model}", f"train.precision={precision}", f"train.compile={str(compile_).lower()}",
                 f"train.batch={batch}", f"device={device}", "train.lr_rampup_kimg=0", *extra]
    cfg = _compose(overrides)
    dist_info = init_distributed(cfg.device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer = Trainer(cfg, dist_info)
    trainer.build_optimisation()
    torch.manual_seed(cfg.seed + dist_info.rank)
    batches = trainer.data_stream()
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    for _ in range(max(3, steps // 4)):  # warm-up (and compilation)
        trainer.train_step(batches)
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batches)
        sync()
        times.append((time.perf_counter() - t0) / steps)
    sec = statistics.median(times)
    row = {"model": model, "precision": precision, "compile": compile_, "batch": batch,
           "world_size": dist_info.world_size, "device": str(trainer.device), "sec_per_step": sec,
           "img_per_s": batch / sec, "params": sum(p.numel() for p in trainer.denoiser.parameters())}
    if trainer.device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
    else:
        row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    try:
        from models.flops import count_flops

        row["gflops_fwd_per_img"] = count_flops(trainer.denoiser.net, img_resolution=trainer.dataset.resolution,
                                                img_channels=trainer.dataset.num_channels,
                                                label_dim=trainer.label_dim) / 1e9
    except Exception:  # noqa: BLE001 - FLOPs are informative only
        row["gflops_fwd_per_img"] = None
    return row


def _run_row(args, model: str, precision: str, compile_: bool, world: int = 1) -> dict:
    """One row in a fresh subprocess (clean memory peak; torchrun for world > 1)."""
    payload = json.dumps({"model": model, "precision": precision, "compile": compile_, "batch": args.batch,
                          "steps": args.steps, "repeats": args.repeats, "device": args.device, "extra": args.set})
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(Path(__file__).resolve()), "--worker", payload]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", payload]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-1500:]
        return {"model": model, "precision": precision, "compile": compile_, "world_size": world,
                "error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {proc.returncode}"}
    return json.loads(lines[0][4:])


def _worker(payload: str) -> None:
    p = json.loads(payload)
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    row = measure(p["model"], p["precision"], p["compile"], p["batch"], p["steps"], p["repeats"], p["device"],
                  p["extra"])
    from training.distributed import get_rank, shutdown_distributed

    if get_rank() == 0:
        print("ROW " + json.dumps(row), flush=True)
    shutdown_distributed()


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="unet_tiny")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks (median)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="threads per process (CPU)")
    parser.add_argument("--set", action="append", default=[], help="extra Hydra override, e.g. data=cifar10")
    parser.add_argument("--ddp", action="store_true", help="also measure 2 processes vs 1 (DDP scaling)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak (dense bf16) for MFU")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker)
        return

    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    rows = []
    for model in args.models.split(","):
        base = None
        for precision in ["fp32"] + [p for p in args.precisions.split(",") if p != "fp32"]:
            for compile_ in ([False] + [c for c in compiles if c]) if precision == "fp32" else compiles:
                row = _run_row(args, model, precision, compile_)
                if base is None and "error" not in row:
                    base = row
                if base is not None and "error" not in row:
                    row["speed_vs_fp32_eager"] = row["img_per_s"] / base["img_per_s"]
                    row["memory_vs_fp32_eager"] = row["peak_mib"] / max(base["peak_mib"], 1e-9)
                    if args.peak_tflops and row.get("gflops_fwd_per_img"):
                        row["mfu"] = 3 * row["gflops_fwd_per_img"] * 1e9 * row["img_per_s"] / (args.peak_tflops * 1e12)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        if args.ddp and base is not None:
            ddp = _run_row(args, model, "fp32", False, world=2)
            if "error" not in ddp:
                # Same global batch on 2 processes: ideal is 2x the 1-process throughput.
                ddp["ddp_scaling_efficiency"] = ddp["img_per_s"] / (2 * base["img_per_s"])
                ddp["speed_vs_fp32_eager"] = ddp["img_per_s"] / base["img_per_s"]
            rows.append(ddp)

    print("\n| model | precision | compile | procs | img/s | ms/step | peak MiB | speed vs fp32 eager | "
          "memory vs fp32 eager | GFLOPs fwd/img | MFU | DDP efficiency |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['precision']} | {r['compile']} | {r.get('world_size', 1)} | error: "
                  f"{r['error'][:80]} |||||||")
            continue
        print(f"| {r['model']} | {r['precision']} | {'yes' if r['compile'] else 'no'} | {r['world_size']} | "
              f"{r['img_per_s']:.1f} | {1000 * r['sec_per_step']:.1f} | {_fmt(r['peak_mib'], '.0f')} | "
              f"{_fmt(r.get('speed_vs_fp32_eager'), '.2f')}x | {_fmt(r.get('memory_vs_fp32_eager'), '.2f')}x | "
              f"{_fmt(r.get('gflops_fwd_per_img'), '.3f')} | {_fmt(r.get('mfu'), '.1%')} | "
              f"{_fmt(r.get('ddp_scaling_efficiency'), '.0%')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
