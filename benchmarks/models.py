"""Training-step throughput and peak memory of every network config (configs/model/*.yaml), printed as a table.

    python benchmarks/models.py                          # all configs, CPU (and a second table on CUDA if present)
    python benchmarks/models.py --models adm,dit_b2 --device cuda --batch 16
    python benchmarks/models.py --reduced                # the reduced widths of tests/test_models_train.py

One step = forward of the EDM-preconditioned network (``diffusion.preconditioning.EDMPrecond``) on a batch of
random images at the config's reference geometry, a squared-error loss, backward (no optimizer step; gradients are
set to None between steps). Reference geometry: SongUNet CIFAR-10 32x32x3 with 10 classes (unet_tiny: the 8x8x1
digits), ADM ImageNet 64x64x3 with 1000 classes, DiT 32x32x4 latents with 1000 classes. Columns:

- params: trainable parameters (M); GMAC/img: multiply-adds of one forward per image (``models.flops.count_macs``,
  DiT's "Gflops" convention; FlopCounterMode FLOPs are twice this);
- img/s: images per second through forward + backward (median over the timed steps), ms/step;
- peak MiB: CUDA: ``torch.cuda.max_memory_allocated`` during the steps (weights + gradients + activations);
  CPU: growth of the process's peak resident set size (``ru_maxrss``) over its size before the network was built,
  measured in a fresh subprocess per network (so it includes the allocator's slack and is an upper bound).

Each network runs in its own subprocess (a clean peak-memory measurement and no cross-talk between networks).
Threads: ``--threads`` (default 1 on CPU, so numbers are comparable between machines and do not disturb others).
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

from configs.model_sizes import canonical_model_config  # noqa: E402

CONFIG_DIR = ROOT / "configs" / "model"
# (resolution, channels, label_dim) per config name, else per arch.
GEOMETRY_BY_NAME = {"unet_tiny": (8, 1, 10), "edm2_tiny": (8, 1, 10)}
GEOMETRY_BY_ARCH = {"songunet": (32, 3, 10), "dhariwalunet": (64, 3, 1000), "dit": (32, 4, 1000),
                    "edm2unet": (64, 4, 1000)}
REDUCED = {  # as tests/test_models_train.py
    "songunet": lambda cfg: dict(model_channels=8, num_blocks=1, dropout=0.0),
    "dhariwalunet": lambda cfg: dict(model_channels=8, channels_per_head=8, num_blocks=1, dropout=0.0),
    "dit": lambda cfg: dict(depth=2, hidden_size=8 * canonical_model_config(cfg)["num_heads"]),
    "edm2unet": lambda cfg: dict(model_channels=8, channels_per_head=8, num_blocks=1, dropout=0.0),
}


def all_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc (Linux); 0 elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def _peak_rss_mib() -> float:
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 2**10  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure(name: str, device: str, batch: int, steps: int, warmup: int, reduced: bool) -> dict:
    """Benchmark one config in this process; returns the table row as a dict."""
    import torch
    from omegaconf import OmegaConf

    from diffusion.preconditioning import EDMPrecond
    from models import build_network, count_parameters
    from models.flops import count_macs

    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    if reduced:
        for key, value in REDUCED[cfg.arch](cfg).items():
            cfg[key] = value
    res, channels, label_dim = GEOMETRY_BY_NAME.get(name, GEOMETRY_BY_ARCH[cfg.arch])
    if reduced:
        res = 32 if cfg.arch == "dit" and cfg.patch_size >= 8 else 16
    dev = torch.device(device)
    with torch.device("meta"):
        macs = count_macs(build_network(cfg, res, channels, label_dim=label_dim), res, channels, label_dim)

    rss_before = _rss_mib()
    torch.manual_seed(0)
    net = build_network(cfg, res, channels, label_dim=label_dim).to(dev).train()
    denoiser = EDMPrecond(net)
    x = torch.randn(batch, channels, res, res, device=dev)
    sigma = torch.exp(torch.randn(batch, device=dev) * 1.2 - 1.2)
    labels = torch.nn.functional.one_hot(torch.arange(batch, device=dev) % label_dim, label_dim).float()
    noisy = x + sigma[:, None, None, None] * torch.randn_like(x)

    def step() -> None:
        loss = (denoiser(noisy, sigma, labels) - x).square().mean()
        loss.backward()
        for p in denoiser.parameters():
            p.grad = None

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = _peak_rss_mib() - rss_before
    seconds = statistics.median(times)
    return dict(
        model=name,
        arch=cfg.arch,
        geometry=f"{res}x{res}x{channels}",
        params_m=count_parameters(net, trainable_only=True) / 1e6,
        gmac=macs / 1e9,
        batch=batch,
        img_s=batch / seconds,
        ms_step=1e3 * seconds,
        peak_mib=peak,
        device=device,
    )


def format_table(rows: list[dict]) -> str:
    header = (
        f"| {'model':<10} | {'geometry':<9} | {'params (M)':>10} | {'GMAC/img':>8} | {'batch':>5} | "
        f"{'img/s':>8} | {'ms/step':>9} | {'peak MiB':>8} |"
    )
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']:<10} | error: {r['error']}")
            continue
        lines.append(
            f"| {r['model']:<10} | {r['geometry']:<9} | {r['params_m']:>10.2f} | {r['gmac']:>8.3f} | {r['batch']:>5} | "
            f"{r['img_s']:>8.2f} | {r['ms_step']:>9.1f} | {r['peak_mib']:>8.0f} |"
        )
    return "\n".join(lines)


def run_all(
    models: list[str], device: str, batch: int, steps: int, warmup: int, reduced: bool, threads: int, timeout: float
) -> list[dict]:
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    for name in models:
        cmd = [
            sys.executable,
            __file__,
            "--single",
            name,
            "--device",
            device,
            "--batch",
            str(batch),
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--threads",
            str(threads),
        ]
        if reduced:
            cmd.append("--reduced")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append(dict(model=name, error=f"timed out after {timeout:.0f}s"))
            continue
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append(dict(model=name, error=tail))
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="all", help="comma-separated config names, or 'all'")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CPU, plus CUDA if present)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 2 on CPU, 16 on CUDA)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per benchmark process")
    parser.add_argument("--reduced", action="store_true", help="reduced widths (as tests/test_models_train.py)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per network before giving up")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)  # internal: one network, JSON to stdout
    args = parser.parse_args(argv)

    if args.single is not None:
        import torch

        torch.set_num_threads(args.threads)
        batch = args.batch or (2 if args.device == "cpu" else 16)
        print(json.dumps(measure(args.single, args.device, batch, args.steps, args.warmup, args.reduced)))
        return

    valid = all_configs()
    models = valid if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in valid]
    if unknown:
        parser.error(f"unknown model config(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    if args.device == "auto":
        import torch

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    for device in devices:
        batch = args.batch or (2 if device == "cpu" else 16)
        threads = f", {args.threads} thread(s)" if device == "cpu" else ""
        print(
            f"\n{device}{threads}: forward + backward of the EDM-preconditioned network, batch {batch}, "
            f"median of {args.steps} steps{' (reduced widths)' if args.reduced else ''}"
        )
        rows = run_all(models, device, batch, args.steps, args.warmup, args.reduced, args.threads, args.timeout)
        print(format_table(rows))


if __name__ == "__main__":
    main()
