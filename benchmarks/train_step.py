"""Training-step throughput, memory and MFU per model x precision x compile, as ratios to fp32 eager; the Trainer's
overhead against a minimal hand-written loop (--vs-plain); DDP scaling (--ddp).

    python benchmarks/train_step.py                                   # CPU: unet_tiny on digits, fp32/bf16, eager
    python benchmarks/train_step.py --vs-plain --precisions fp32 --repeats 9     # Trainer vs plain loop, CPU
    python benchmarks/train_step.py --models ddpmpp,dit_xl2 --precisions fp32,bf16 --compile both --batch 64  # GPU
    python benchmarks/train_step.py --ddp                             # + 1 vs 2 processes (gloo on CPU, NCCL on GPU)
    python benchmarks/train_step.py --json out.json

Each row builds ``training.trainer.Trainer`` from the real configs (``--set key=value`` adds overrides), warms up
(compilation included), then times ``Trainer.train_step`` — data loading, σ and noise draws, forward, backward, the
optimizer and the EMA — in blocks of ``--steps`` steps, median of ``--repeats`` blocks. The first row of each model
(fp32, eager) is its baseline; every other row prints its speed and memory relative to it.

Data (``--data``): ``digits`` (the embedded 8x8 digits), or ``synthetic``: random data written once to a temporary
prepared dataset at the model's reference geometry (SongUNet: 32x32x3 pixels, 10 classes, as CIFAR-10; DiT: 32x32x4
latents, 1000 classes, as ImageNet-256 in SD-VAE latents; ADM: 64x64x3, 1000 classes), read through the same loader
as real data. ``auto``: digits for unet_tiny, synthetic otherwise.

``--vs-plain``: in the same process as the Trainer row, a minimal hand-written loop on the same network (a copy of the
Trainer's preconditioned denoiser, same weights), the same batch, precision and loss — a shuffling DataLoader, ln σ ~
N(P_mean, P_std²), EDM's weight (σ² + σ_d²)/(σ·σ_d)², backward, ``torch.optim.Adam`` with PyTorch's default
implementation, an EMA as a per-parameter ``lerp_`` loop, compiled as the row is. Blocks of the two alternate (plain,
Trainer, plain, Trainer, ...), so that load from other processes hits both alike; the printed ratio is the median over
the ``--repeats`` pairs of (Trainer img/s) / (plain img/s), by the wall clock and by this process's CPU time (on a CPU
shared with other jobs the steadier of the two; on a GPU only the wall clock means anything): above 1 the Trainer
costs nothing over a plain loop.

Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the growth of the peak resident set size of a fresh
subprocess per row (an upper bound). MFU (GPU): achieved FLOP/s (3 x forward FLOPs per image, the usual forward +
backward estimate, ``models.flops.count_flops``) over the GPU's dense bf16 peak (``--peak-tflops``, else the table
``PEAK_BF16_TFLOPS`` by device name; the source of the peak is printed). fp32 rows are set against the same bf16 peak.

Timings are only comparable within one run on one otherwise idle machine: that is why everything is a ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s, matched by substring of
# torch.cuda.get_device_name (first match wins: the more specific names come first).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0), ("A10G", 70.0),
    ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("V100", 125.0),
)
# Reference geometry of each architecture for synthetic data: (resolution, channels, classes, kind).
SYNTHETIC_GEOMETRY = {"songunet": (32, 3, 10, "pixels"), "dit": (32, 4, 1000, "latents"),
                      "dhariwalunet": (64, 3, 1000, "pixels"), "edm2unet": (64, 4, 1000, "latents")}


def peak_tflops(device_name: str, override: float | None) -> tuple[float | None, str]:
    """The bf16 peak used for MFU and where it comes from."""
    if override:
        return override, "--peak-tflops"
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value, f"table entry '{key}'"
    return None, "unknown device: pass --peak-tflops"


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def write_synthetic(root: Path, arch: str, num_images: int = 1024) -> list[str]:
    """A prepared dataset of random data at ``arch``'s reference geometry under ``root``; its data overrides."""
    import numpy as np

    from data.shards import ShardedWriter, default_shard_size

    res, channels, classes, kind = SYNTHETIC_GEOMETRY[arch]
    rng = np.random.default_rng(0)
    labels = np.arange(num_images) % classes
    path = root / f"synthetic-{arch}"
    if kind == "pixels":
        items = rng.integers(0, 256, size=(num_images, channels, res, res), dtype=np.uint8)
        meta = {"kind": "pixels", "num_classes": classes}
        shape = (channels, res, res)
    else:
        items = rng.standard_normal((num_images, 1, channels, res, res)).astype(np.float32)
        meta = {"kind": "latents", "variants": 1, "num_classes": classes,
                "latent": {"vae": "none", "scaling_factor": 0.18215, "image_resolution": res * 8,
                           "mean": [0.0] * channels, "std": [1.0] * channels}}
        shape = (1, channels, res, res)
    writer = ShardedWriter(path, num_items=num_images, item_shape=shape, dtype=items.dtype,
                           shard_size=default_shard_size(items[0].nbytes), settings={"benchmark": arch})
    for k in writer.pending_shards():
        start, stop = writer.shard_range(k)
        writer.write_shard(k, items[start:stop])
    writer.finalize(meta, labels)
    group = "imagenet64" if kind == "pixels" else "imagenet256_latent"
    return [f"data={group}", "data.name=synthetic", f"data.path={path}", f"data.resolution={res}",
            f"data.channels={channels}", "data.cond=true", "data.xflip=false"]


class PlainLoop:
    """The minimal hand-written EDM training loop that ``--vs-plain`` compares the Trainer with (see the docstring)."""

    def __init__(self, trainer, compile_: bool):
        import torch

        cfg, self.device = trainer.cfg, trainer.device
        if cfg.schedule.name != "lognormal" or cfg.weighting.name != "edm" or cfg.precond.name != "edm":
            raise SystemExit("--vs-plain writes EDM's loss by hand: use schedule=lognormal weighting=edm precond=edm")
        self.p_mean, self.p_std, self.sigma_data = cfg.schedule.p_mean, cfg.schedule.p_std, cfg.precond.sigma_data
        self.net = copy.deepcopy(trainer.denoiser).train()
        self.forward = torch.compile(self.net) if compile_ else self.net
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                          eps=cfg.train.eps)
        self.dataset, self.batch, self.label_dim = trainer.dataset, trainer.batch, trainer.label_dim
        self.dtype = trainer.autocast_dtype
        self.workers = getattr(trainer, "loader_workers", 0)
        self.batches = self._batches()

    def _batches(self):
        import torch

        while True:  # a fresh shuffle per epoch, as a plain loop would do it
            yield from torch.utils.data.DataLoader(self.dataset, batch_size=self.batch, shuffle=True, drop_last=True,
                                                   num_workers=self.workers, pin_memory=self.device.type == "cuda")

    def step(self) -> None:
        import torch

        from data import to_model_space

        images, labels = next(self.batches)
        y = images.to(self.device, non_blocking=True)
        y = y if self.dataset.latent else to_model_space(y)
        onehot = None
        if self.label_dim:
            onehot = torch.nn.functional.one_hot(labels.to(self.device), self.label_dim).float()
        sigma = (torch.randn(y.shape[0], device=self.device) * self.p_std + self.p_mean).exp()
        noisy = y + torch.randn_like(y) * sigma.view(-1, 1, 1, 1)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            denoised = self.forward(noisy, sigma, class_labels=onehot)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        loss = (weight.view(-1, 1, 1, 1) * (denoised.float() - y).square()).sum() / y.shape[0]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.net.parameters()):
                p_ema.lerp_(p, 1.0 - 0.999)


def _timed(fn, steps: int, sync) -> tuple[float, float]:
    """(wall-clock seconds, this process's CPU seconds) per call of ``fn``."""
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def measure(model: str, precision: str, compile_: bool, batch: int, steps: int, repeats: int, device: str,
            extra: list[str], vs_plain: bool = False) -> dict:
    """Time the training step of one configuration in this process (and the plain loop beside it)."""
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
    cuda = trainer.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    plain = PlainLoop(trainer, compile_) if vs_plain else None
    for _ in range(max(3, steps // 4)):  # warm-up (and compilation)
        trainer.train_step(batches)
        if plain is not None:
            plain.step()
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.device)
    timings, plain_timings = [], []
    for _ in range(repeats):  # interleaved blocks: plain, Trainer, plain, Trainer, ...
        if plain is not None:
            plain_timings.append(_timed(plain.step, steps, sync))
        timings.append(_timed(lambda: trainer.train_step(batches), steps, sync))
    times = [wall for wall, _ in timings]
    sec = statistics.median(times)
    row = {"model": model, "precision": precision, "compile": compile_, "batch": batch,
           "world_size": dist_info.world_size, "device": str(trainer.device), "sec_per_step": sec,
           "img_per_s": batch / sec, "params": sum(p.numel() for p in trainer.denoiser.parameters()),
           "repeats": repeats, "steps_per_block": steps, "threads": torch.get_num_threads(),
           "device_name": torch.cuda.get_device_name(trainer.device) if cuda else "cpu"}
    if plain is not None:
        # (Trainer img/s) / (plain img/s) per pair, by the wall clock and by this process's CPU time (on a CPU shared
        # with other jobs the CPU time is the steadier measure of the work done; on a GPU only the wall clock counts).
        ratios = [p[0] / t[0] for p, t in zip(plain_timings, timings)]
        cpu_ratios = [p[1] / t[1] for p, t in zip(plain_timings, timings)]
        row.update(plain_img_per_s=batch / statistics.median(p[0] for p in plain_timings),
                   vs_plain=statistics.median(ratios), vs_plain_range=[min(ratios), max(ratios)],
                   vs_plain_cpu_time=statistics.median(cpu_ratios),
                   vs_plain_cpu_time_range=[min(cpu_ratios), max(cpu_ratios)])
    if cuda:
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


def _run_row(args, model: str, precision: str, compile_: bool, extra: list[str], world: int = 1) -> dict:
    """One row in a fresh subprocess (clean memory peak; torchrun for world > 1)."""
    payload = json.dumps({"model": model, "precision": precision, "compile": compile_, "batch": args.batch,
                          "steps": args.steps, "repeats": args.repeats, "device": args.device,
                          "extra": [*extra, *args.set], "vs_plain": args.vs_plain and world == 1,
                          "compile_backend": args.compile_backend})
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
    if p.get("compile_backend"):  # the benchmark's choice, for every torch.compile the Trainer makes
        import functools

        torch.compile = functools.partial(torch.compile, backend=p["compile_backend"])
    row = measure(p["model"], p["precision"], p["compile"], p["batch"], p["steps"], p["repeats"], p["device"],
                  p["extra"], vs_plain=p["vs_plain"])
    row["compile_backend"] = (p.get("compile_backend") or "inductor") if p["compile"] else None
    from training.distributed import get_rank, shutdown_distributed

    if get_rank() == 0:
        print("ROW " + json.dumps(row), flush=True)
    shutdown_distributed()


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _data_overrides(args, model: str, tmp: Path) -> list[str]:
    arch = _compose([f"model={model}"]).model.arch
    use = args.data if args.data != "auto" else ("digits" if model == "unet_tiny" else "synthetic")
    if use == "digits" or arch not in SYNTHETIC_GEOMETRY:
        return []
    return write_synthetic(tmp, arch)


def _print_table(rows: list[dict], peak: float | None, peak_source: str) -> None:
    print(f"\nMFU against a dense bf16 peak of {_fmt(peak, '.1f')} TFLOP/s ({peak_source})" if peak else "")
    print("| model | precision | compile | procs | img/s | ms/step | peak MiB | speed vs fp32 eager | "
          "memory vs fp32 eager | GFLOPs fwd/img | MFU | DDP efficiency |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['precision']} | {r['compile']} | {r.get('world_size', 1)} | error: "
                  f"{r['error'][:80]} |||||||")
            continue
        compiled = "no" if not r["compile"] else ("yes" if r.get("compile_backend") in (None, "inductor")
                                                  else f"yes ({r['compile_backend']})")
        print(f"| {r['model']} | {r['precision']} | {compiled} | {r['world_size']} | "
              f"{r['img_per_s']:.1f} | {1000 * r['sec_per_step']:.1f} | {_fmt(r['peak_mib'], '.0f')} | "
              f"{_fmt(r.get('speed_vs_fp32_eager'), '.2f')}x | {_fmt(r.get('memory_vs_fp32_eager'), '.2f')}x | "
              f"{_fmt(r.get('gflops_fwd_per_img'), '.3f')} | {_fmt(r.get('mfu'), '.1%')} | "
              f"{_fmt(r.get('ddp_scaling_efficiency'), '.0%')} |")
    plain = [r for r in rows if "vs_plain" in r]
    if plain:
        print("\nTrainer vs a minimal hand-written loop (same network, batch, precision and loss; interleaved blocks; "
              "median over the pairs)")
        print("| model | precision | compile | Trainer img/s | plain img/s | Trainer / plain (wall) | range | "
              "Trainer / plain (CPU time) | range | pairs x steps |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in plain:
            lo, hi = r["vs_plain_range"]
            clo, chi = r["vs_plain_cpu_time_range"]
            print(f"| {r['model']} | {r['precision']} | {'yes' if r['compile'] else 'no'} | {r['img_per_s']:.1f} | "
                  f"{r['plain_img_per_s']:.1f} | **{r['vs_plain']:.3f}x** | {lo:.3f}-{hi:.3f} | "
                  f"{r['vs_plain_cpu_time']:.3f}x | {clo:.3f}-{chi:.3f} | {r['repeats']} x {r['steps_per_block']} |")


def _row_specs(args) -> list[tuple[str, bool]]:
    """(precision, compile) of each row; the first is the baseline."""
    if args.rows:
        return [(spec.split("+")[0], spec.endswith("+compile")) for spec in args.rows.split(",")]
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    specs = []
    for precision in ["fp32"] + [p for p in args.precisions.split(",") if p != "fp32"]:
        for compile_ in ([False] + [c for c in compiles if c]) if precision == "fp32" else compiles:
            specs.append((precision, compile_))
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="unet_tiny")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off")
    parser.add_argument("--rows", default=None,
                        help="instead of --precisions/--compile: e.g. fp32,bf16,bf16+compile (the first is the base)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend for compiled rows (default inductor; aot_eager: trace only, fast)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks (median)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="threads per process (CPU)")
    parser.add_argument("--data", choices=["auto", "digits", "synthetic"], default="auto")
    parser.add_argument("--set", action="append", default=[], help="extra Hydra override, e.g. model.model_channels=32")
    parser.add_argument("--vs-plain", action="store_true", help="also time a minimal hand-written loop (same process)")
    parser.add_argument("--ddp", action="store_true", help="also measure 2 processes vs 1 (DDP scaling)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device's dense bf16 peak, for MFU")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker)
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="sigmalab-bench-") as tmp:
        for model in args.models.split(","):
            extra = _data_overrides(args, model, Path(tmp))
            base = None
            for precision, compile_ in _row_specs(args):
                row = _run_row(args, model, precision, compile_, extra)
                if base is None and "error" not in row:
                    base = row
                if base is not None and "error" not in row:
                    row["speed_vs_fp32_eager"] = row["img_per_s"] / base["img_per_s"]
                    row["memory_vs_fp32_eager"] = row["peak_mib"] / max(base["peak_mib"], 1e-9)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            if args.ddp and base is not None:
                ddp = _run_row(args, model, "fp32", False, extra, world=2)
                if "error" not in ddp:
                    # Same global batch on 2 processes: ideal is 2x the 1-process throughput.
                    ddp["ddp_scaling_efficiency"] = ddp["img_per_s"] / (2 * base["img_per_s"])
                    ddp["speed_vs_fp32_eager"] = ddp["img_per_s"] / base["img_per_s"]
                rows.append(ddp)
    names = {r.get("device_name") for r in rows if r.get("device_name") not in (None, "cpu")}
    peak, source = peak_tflops(next(iter(names)), args.peak_tflops) if names else (args.peak_tflops, "--peak-tflops")
    for r in rows:
        if peak and r.get("gflops_fwd_per_img") and "error" not in r:
            r["mfu"] = 3 * r["gflops_fwd_per_img"] * 1e9 * r["img_per_s"] / (peak * 1e12)
            r["peak_tflops"], r["peak_source"] = peak, source
    _print_table(rows, peak, source)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
