"""The sigmalab checkpoint: one file holding everything a run needs to continue exactly, written atomically.

Layout (a plain dict of tensors, numbers, strings, lists and dicts — loadable with ``torch.load(weights_only=True)``,
so opening a checkpoint never runs code):

    format: "sigmalab-checkpoint", version: 1
    config:   the run's resolved config (plain dict)
    geometry: {img_resolution, img_channels, label_dim, augment_dim, latent_info} — what the network was built for
    progress: {cur_nimg, step, skipped_steps}
    net, ema, optimizer, scaler: state dicts (scaler: fp16's loss scaler; absent in the oldest checkpoints)
    schedule: [one state dict per process] (an adaptive schedule's state, e.g. InfoNoise's, incl. per-rank windows)
    rng: [one {torch: CPU generator state, noise: the run's σ/noise generator state, cuda: [per-device states],
          present where CUDA was} per process] (``training.rng.capture_rng_state``)
    ema_power:   train.ema=power only: {sigma_rels, profiles: [state dicts of the profiles after the first]} (the
                 first profile is ``ema``; ``training.posthoc_ema``)
    uncertainty: weighting=edm2_uncertainty only: the learned u(σ)'s state dict (not averaged into any EMA)
Older checkpoints lack the last two; runs that do not use them never read them (``optional_entries``).

Files are named ``checkpoint-<images seen, 10 digits>.pt`` inside ``<run_dir>/checkpoints/``. ``save_checkpoint``
writes to a temporary file in the same directory, fsyncs it, renames it over the target (atomic on POSIX) and fsyncs
the directory, so a crash or a full disk mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from data.atomic import atomic_open, atomic_write_bytes

FORMAT = "sigmalab-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_NAME_RE = re.compile(r"^checkpoint-(\d{10})\.pt$")


class CheckpointError(RuntimeError):
    """A file that is not a usable sigmalab checkpoint."""


def checkpoint_name(cur_nimg: int) -> str:
    return f"checkpoint-{int(cur_nimg):010d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints of a run directory, oldest first (by images seen)."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the newest checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoints in run directory {path} (expected {path / CHECKPOINT_DIR}/"
                                    "checkpoint-*.pt)")
        return latest
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (tagged with the format and version) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file (or the newest one of a run directory) without executing any code."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a checkpoint we can read"
        raise CheckpointError(f"{path} is not a readable sigmalab checkpoint: {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sigmalab checkpoint (missing format tag '{FORMAT}')")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {state.get('version')}; this sigmalab reads "
                              f"version {VERSION}")
    return state


def optional_entries(ema: Any, uncertainty: torch.nn.Module | None) -> dict[str, Any]:
    """The entries only some runs have: ``ema_power`` (an EMA with ``extra_state``, train.ema=power) and
    ``uncertainty`` (the learned u(σ) of weighting=edm2_uncertainty)."""
    entries: dict[str, Any] = {}
    if hasattr(ema, "extra_state"):
        entries["ema_power"] = ema.extra_state()
    if uncertainty is not None:
        entries["uncertainty"] = uncertainty.state_dict()
    return entries


def restore_optional_entries(state: dict[str, Any], ema: Any, uncertainty: torch.nn.Module | None) -> None:
    """Load what ``optional_entries`` saved into the run's EMA and u(σ) (a run resumes only a checkpoint of the same
    config, so an entry the run needs is present)."""
    if hasattr(ema, "load_extra_state"):
        ema.load_extra_state(state["ema_power"])
    if uncertainty is not None:
        uncertainty.load_state_dict(state["uncertainty"])


def _nimg_of(path: Path) -> int:
    return int(_NAME_RE.match(path.name).group(1))


def prune_checkpoints(run_dir: str | os.PathLike, keep: int, keep_every_nimg: int | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (keep <= 0 keeps everything); returns the deleted paths.

    With ``keep_every_nimg`` = E, the first checkpoint at or after each multiple of E (E, 2E, ...) is kept for ever,
    e.g. for FID-vs-training curves. The rule depends only on the checkpoints present, and only unprotected ones are
    ever deleted, so it stays stable from one pruning to the next.
    """
    if keep <= 0:
        return []
    ckpts = list_checkpoints(run_dir)
    protected: set[Path] = set(ckpts[-keep:])
    if keep_every_nimg:
        prev_bucket = 0
        for p in ckpts:
            bucket = _nimg_of(p) // keep_every_nimg
            if bucket > prev_bucket:
                protected.add(p)
            prev_bucket = bucket
    doomed = [p for p in ckpts if p not in protected]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def export_safetensors(path: str | os.PathLike, out: str | os.PathLike, ema: bool = True) -> Path:
    """Write a checkpoint's network weights (EMA by default) as safetensors, with the config in the metadata.

    The file holds only tensors; the metadata strings ``config`` (JSON) and ``geometry`` (JSON) say how to rebuild
    the network (``training.denoiser.build_denoiser``). Written atomically like the checkpoints;
    ``load_denoiser`` reads these files too.
    """
    import json

    from safetensors.torch import save as safetensors_bytes

    state = load_checkpoint(path)
    weights = {k: v.contiguous() for k, v in state["ema" if ema else "net"].items()}
    metadata = {"format": "sigmalab-weights", "weights": "ema" if ema else "net",
                "config": json.dumps(state["config"]), "geometry": json.dumps(state["geometry"]),
                "progress": json.dumps(state["progress"])}
    atomic_write_bytes(out, safetensors_bytes(weights, metadata=metadata))
    return out


def load_denoiser(path: str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu"):
    """Rebuild the denoiser of a checkpoint (EMA weights by default); returns ``(denoiser, config)``."""
    from omegaconf import OmegaConf

    from training.denoiser import denoiser_from_geometry

    path = Path(path)
    if path.suffix == ".safetensors":
        return _load_safetensors_denoiser(path, device)
    state = load_checkpoint(path)
    cfg = OmegaConf.create(state["config"])
    geometry = state["geometry"]
    denoiser = denoiser_from_geometry(cfg, geometry)
    denoiser.load_state_dict(state["ema" if ema else "net"])
    return denoiser.eval().requires_grad_(False).to(device), cfg


def _load_safetensors_denoiser(path: Path, device: str | torch.device):
    import json

    from omegaconf import OmegaConf
    from safetensors import safe_open
    from safetensors.torch import load_file

    from training.denoiser import denoiser_from_geometry

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != "sigmalab-weights":
        raise CheckpointError(f"{path} is not a sigmalab weights file (no 'sigmalab-weights' metadata)")
    cfg = OmegaConf.create(json.loads(metadata["config"]))
    geometry = json.loads(metadata["geometry"])
    denoiser = denoiser_from_geometry(cfg, geometry)
    denoiser.load_state_dict(load_file(str(path)))
    return denoiser.eval().requires_grad_(False).to(device), cfg


def _main(argv: list[str] | None = None) -> None:
    """``python -m training.checkpoint export <checkpoint or run dir> <out.safetensors> [--raw]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.checkpoint", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write the (EMA) network weights of a checkpoint as safetensors")
    exp.add_argument("checkpoint", help="checkpoint file, or a run directory (its newest checkpoint)")
    exp.add_argument("out", help="output .safetensors path")
    exp.add_argument("--raw", action="store_true", help="export the raw training weights instead of the EMA")
    args = parser.parse_args(argv)
    out = export_safetensors(args.checkpoint, args.out, ema=not args.raw)
    print(f"wrote {out}")


if __name__ == "__main__":
    _main()
