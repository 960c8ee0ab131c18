"""Cost of InfoNoise per training step, against EDM's log-normal schedule, on the tiny UNet with digits-sized batches.

    OMP_NUM_THREADS=1 python benchmarks/infonoise_overhead.py [--batch 64] [--block 100] [--repeats 10]
                                                             [--device cpu] [--threads 1]

Two identical denoisers (``configs/model/unet_tiny.yaml`` + EDM preconditioning, same initial weights), one trained
with ``schedule=lognormal`` and one with ``schedule=infonoise`` (past its warm-up, so σ is drawn from the table),
take full training steps (σ draw, loss, backward, Adam, ``update``, ``on_step``) in interleaved blocks of ``--block``
steps; each block of InfoNoise contains exactly one refresh when ``--block`` is a multiple of its ``refresh_every``
(100). On CPU the time is this process's CPU time (``time.process_time``; with one thread it is what the step costs,
and other jobs on the machine barely disturb it), on CUDA wall-clock time with synchronisation. Reported: the median
block time of each arm and their ratio (target ≤ 1.01), the median of the per-repeat
paired ratios, and — measured separately, far more precisely — the schedule work alone per step (draw + update +
on_step, refreshes amortised) for both schedules, as a fraction of the log-normal step time.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from diffusion.loss import DenoisingLoss  # noqa: E402
from diffusion.schedules.infonoise import InfoNoise  # noqa: E402
from diffusion.schedules.lognormal import LogNormal  # noqa: E402
from diffusion.weighting import EDMWeighting  # noqa: E402
from training.denoiser import build_denoiser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def digits_batches(batch: int, device: torch.device) -> list[torch.Tensor]:
    """The 8x8 scikit-learn digits in model space, cut into batches (the data the tiny UNet trains on)."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images).float() / 16.0 * 2.0 - 1.0
    x = x[:, None].to(device)
    return [x[i:i + batch] for i in range(0, len(x) - batch + 1, batch)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Arm:
    """One model + optimizer + schedule, stepping like the training loop (``training.trainer``)."""

    def __init__(self, denoiser: torch.nn.Module, schedule, weighting, device: torch.device, lr: float = 1e-3):
        self.net = denoiser
        self.schedule = schedule.to(device)
        self.loss = DenoisingLoss(self.schedule, weighting)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.step_count = 0

    def steps(self, batches: list[torch.Tensor], count: int) -> None:
        for _ in range(count):
            images = batches[self.step_count % len(batches)]
            self.opt.zero_grad(set_to_none=True)
            out = self.loss(self.net, images)
            out.loss.sum().div(images.shape[0]).backward()
            self.opt.step()
            self.step_count += 1
            self.schedule.update(out.sigma, out.mse)
            self.schedule.on_step(self.step_count)


def clock(device: torch.device) -> float:
    return time.process_time() if device.type == "cpu" else time.perf_counter()


def schedule_only_time(schedule, batch: int, steps: int, device: torch.device, start_step: int) -> float:
    """Seconds per step of the schedule's own work: draw σ, update with fake errors, on_step (refreshes included)."""
    fake_mse = torch.rand(batch, device=device) * 10
    sync(device)
    t0 = clock(device)
    for i in range(steps):
        sigma = schedule.sample(batch, device=device)
        schedule.update(sigma, fake_mse)
        schedule.on_step(start_step + i + 1)
    sync(device)
    return (clock(device) - t0) / steps


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--block", type=int, default=100, help="steps per timed block (one InfoNoise refresh each)")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved block pairs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    cfg = OmegaConf.create({"model": OmegaConf.load(ROOT / "configs/model/unet_tiny.yaml"),
                            "precond": OmegaConf.load(ROOT / "configs/precond/edm.yaml")})
    torch.manual_seed(0)
    net = build_denoiser(cfg, img_resolution=8, img_channels=1).to(device).train()
    weighting = EDMWeighting(0.5)
    batches = digits_batches(args.batch, device)
    info = InfoNoise(weighting=weighting, sigma_data=0.5, num_dims=64, warmup_steps=args.block)
    arms = {"lognormal": Arm(net, LogNormal(), weighting, device),
            "infonoise": Arm(copy.deepcopy(net), info, weighting, device)}
    # Warm up both (allocator, kernels) and take InfoNoise past its warm-up so it samples from its table.
    for arm in arms.values():
        arm.steps(batches, 2 * args.block)
    assert not info.in_warmup, "InfoNoise should be past its warm-up"

    times: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(args.repeats):
        order = list(arms) if r % 2 == 0 else list(reversed(arms))  # alternate which arm goes first
        for name in order:
            sync(device)
            t0 = clock(device)
            arms[name].steps(batches, args.block)
            sync(device)
            times[name].append((clock(device) - t0) / args.block)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(i / b for i, b in zip(times["infonoise"], times["lognormal"]))

    n_sched = 20 * args.block
    t_logn = schedule_only_time(LogNormal().to(device), args.batch, n_sched, device, 0)
    fresh = InfoNoise(weighting=weighting, sigma_data=0.5, warmup_steps=0).to(device)
    schedule_only_time(fresh, args.batch, args.block, device, 0)  # first refresh → table active
    t_info = schedule_only_time(fresh, args.batch, n_sched, device, args.block)

    result = {
        "step_ms_lognormal": 1e3 * med["lognormal"], "step_ms_infonoise": 1e3 * med["infonoise"],
        "ratio_median_blocks": med["infonoise"] / med["lognormal"], "ratio_median_paired": paired,
        "schedule_us_lognormal": 1e6 * t_logn, "schedule_us_infonoise": 1e6 * t_info,
        "schedule_overhead_fraction": (t_info - t_logn) / med["lognormal"],
    }
    print(f"device {device}, {args.threads} thread(s), batch {args.batch}, tiny UNet on 8x8 digits, "
          f"{args.repeats} x {args.block} steps per arm (interleaved), "
          f"{'process CPU time' if device.type == 'cpu' else 'wall clock'}")
    print(f"  training step, median      lognormal {result['step_ms_lognormal']:8.3f} ms   "
          f"infonoise {result['step_ms_infonoise']:8.3f} ms")
    print(f"  ratio infonoise/lognormal  median blocks {result['ratio_median_blocks']:.4f}   "
          f"median paired {result['ratio_median_paired']:.4f}   (target <= 1.01)")
    print(f"  schedule work per step     lognormal {result['schedule_us_lognormal']:8.1f} us   "
          f"infonoise {result['schedule_us_infonoise']:8.1f} us   (refresh every {info.refresh_every} steps "
          "amortised)")
    print(f"  => InfoNoise's own cost:   {100 * result['schedule_overhead_fraction']:.3f}% of a log-normal step")
    if not all(math.isfinite(v) for v in result.values()):
        raise RuntimeError(f"non-finite timing: {result}")
    return result


if __name__ == "__main__":
    main()
