"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2,
arXiv 2312.02696, Sec. 3 and App. C): track a few power-function EMA profiles while training, save low-precision
snapshots of them now and then, and after training reconstruct the EMA of *any* length from those snapshots.

**Power-function EMA profile** (EDM2 Sec. 3). For an exponent γ > −1, the average of the weights θ(τ) seen up to time
t is

    θ̂_γ(t) = ∫₀ᵗ p_γ,t(τ)·θ(τ) dτ,     p_γ,t(τ) = (γ + 1)·τ^γ / t^(γ+1)   on 0 < τ ≤ t  (∫ p = 1),

a window whose length grows with training, and whose width relative to t is the *relative standard deviation*

    σ_rel = √((γ + 1) / ((γ + 2)²·(γ + 3)))          (e.g. γ(0.05) ≈ 16.97, γ(0.10) ≈ 6.94).

σ_rel is the parameter users choose; γ is the largest real root of σ_rel²·(γ + 2)²·(γ + 3) − (γ + 1) = 0
(``sigma_rel_to_gamma``; σ_rel(γ) rises from 0 at γ = −1 to its maximum ≈ 0.3003 at γ = (√5 − 3)/2 and falls
after, so only σ_rel in (0, 0.3003) exist, each on the branch γ ≥ (√5 − 3)/2).

**Tracking it during training** (EDM2 Sec. 3 / App. C): after the optimizer step that brings the images seen to n,
with a constant batch of B images,

    θ̂ ← β·θ̂ + (1 − β)·θ,     β = (1 − B/n)^(γ+1)

(EDM2's training code counts images; with t = n/B the step count this is EDM2's β = (1 − 1/t)^(γ+1), the same
numbers). It is *exactly* the profile above applied to the piecewise-constant trajectory θ(τ) = θ_k on
((k − 1)B, kB], θ_k the weights after step k: unrolling the recursion gives θ_k the weight
(k^(γ+1) − (k − 1)^(γ+1)) / t^(γ+1) = ∫ p_γ,t over that interval. So reconstruction can work in continuous time, with
images as the time unit, and be exact for the discrete EMA.

**Snapshots** of every tracked profile are written every ``train.ema_snapshot_kimg`` and at the end of training, in
low precision (``train.ema_snapshot_dtype``, fp16 as EDM2), atomically, to ``<run>/ema_snapshots/
phema-<images seen, 10 digits>-<σ_rel>.pt`` (one file per profile and time: tensors and plain data, read with
``torch.load(weights_only=True)``; each carries the run's config and data geometry, so it rebuilds its network alone).

**Reconstruction** (EDM2 App. C, "synthesizing novel EMA profiles"): the snapshots are EMAs with known profiles
p_i = p_γi,ti. An EMA with any profile p_r = p_γr,tr (t_r a snapshot time, all t_i ≤ t_r) is approximated by the
combination Σᵢ xᵢ·θ̂ᵢ whose profile Σᵢ xᵢ·pᵢ is closest to p_r in L²(0, ∞): the normal equations

    A·x = b,     A_ij = ⟨p_i, p_j⟩,   b_i = ⟨p_i, p_r⟩,

with the inner product of two power-function profiles in closed form (derived here: both vanish beyond their t,
so integrate τ^(γa+γb) up to m = min(t_a, t_b)):

    ⟨p_a, p_b⟩ = (γa + 1)(γb + 1)·m^(γa+γb+1) / ((γa + γb + 1)·t_a^(γa+1)·t_b^(γb+1)),

finite for γa + γb > −1 (always true on the branch above). Scaling every t by c scales A and b alike (by 1/c), so x
does not depend on the time unit; the times are divided by t_r for conditioning and the system is solved by least
squares in float64. The reconstructed parameters are Σᵢ xᵢ·θ̂ᵢ; buffers (constants such as Fourier frequencies) are
taken from the newest snapshot, never averaged. ``fit_residual`` = ‖Σ xᵢ pᵢ − p_r‖ / ‖p_r‖ says how well the tracked
profiles span the requested one (0 for a tracked σ_rel).
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data.atomic import atomic_open

SNAPSHOT_DIR = "ema_snapshots"
SNAPSHOT_FORMAT = "sigmalab-ema-snapshot"
SNAPSHOT_VERSION = 1
SNAPSHOT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
EMA_KINDS = ("halflife", "power")
GAMMA_AT_MAX = (math.sqrt(5.0) - 3.0) / 2.0  # argmax of σ_rel(γ): γ² + 3γ + 1 = 0
_NAME_RE = re.compile(r"^phema-(\d{10})-(.+)\.pt$")


# --- σ_rel <-> γ --------------------------------------------------------------------------------------------------

def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel = √((γ + 1) / ((γ + 2)²(γ + 3))), the relative standard deviation of the power-function profile."""
    if not gamma > -1:
        raise ValueError(f"the power-function EMA exponent must be > -1, got {gamma}")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


SIGMA_REL_MAX = gamma_to_sigma_rel(GAMMA_AT_MAX)  # ≈ 0.3003


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """γ of the power-function profile with relative standard deviation ``sigma_rel`` (the root on γ ≥ (√5−3)/2)."""
    s = float(sigma_rel)
    if not (math.isfinite(s) and 0 < s < SIGMA_REL_MAX):
        raise ValueError(f"EMA sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}) (the longest power-function EMA), "
                         f"got {sigma_rel}")
    s2 = s * s
    # σ²(γ + 2)²(γ + 3) − (γ + 1) = σ²γ³ + 7σ²γ² + (16σ² − 1)γ + 12σ² − 1
    roots = np.roots([s2, 7.0 * s2, 16.0 * s2 - 1.0, 12.0 * s2 - 1.0])
    real = roots[np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots.real))].real
    gamma = float(real.max())
    # One Newton step on the real root polishes the eigenvalue solver's last digits.
    f = s2 * (gamma + 2) ** 2 * (gamma + 3) - (gamma + 1)
    df = s2 * (2 * (gamma + 2) * (gamma + 3) + (gamma + 2) ** 2) - 1
    return gamma - f / df if df != 0 else gamma


def power_ema_beta(gamma: float, cur_nimg: int, batch: int) -> float:
    """β = (1 − B/n)^(γ+1) for the update that brings the images seen to n = ``cur_nimg`` (0 at the first step)."""
    return max(1.0 - batch / cur_nimg, 0.0) ** (gamma + 1.0)


# --- the tracked EMAs -----------------------------------------------------------------------------------------------

class PowerFunctionEMA:
    """One power-function EMA per σ_rel of ``sigma_rels``, updated with fused ``torch._foreach_*`` ops.

    The first profile is the run's "EMA": ``model``, ``state_dict`` (the checkpoint's ``ema`` entry), sample grids,
    evaluation during training and ``ema.safetensors`` use it; ``extra_state`` holds the others for the checkpoint.
    """

    kind = "power"

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float]):
        sigma_rels = [float(s) for s in sigma_rels]
        if not sigma_rels:
            raise ValueError("train.ema_sigma_rels: give at least one σ_rel for train.ema=power, e.g. [0.05, 0.10]")
        if len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"train.ema_sigma_rels: duplicate values in {sigma_rels}")
        self.sigma_rels = sigma_rels
        self.gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
        self.profiles = [copy.deepcopy(model).eval().requires_grad_(False) for _ in sigma_rels]

    @property
    def model(self) -> nn.Module:
        return self.profiles[0]

    @torch.no_grad()
    def update(self, model: nn.Module, cur_nimg: int, batch_size: int) -> float:
        """Blend ``model`` into every profile; ``cur_nimg`` counts images seen *including* this step. Returns the
        first profile's β."""
        src_params = [p.detach() for p in model.parameters()]
        src_buffers = list(model.buffers())
        betas = []
        for gamma, ema in zip(self.gammas, self.profiles, strict=True):
            beta = power_ema_beta(gamma, cur_nimg, batch_size)
            betas.append(beta)
            torch._foreach_lerp_(list(ema.parameters()), src_params, 1.0 - beta)
            if src_buffers:
                torch._foreach_copy_(list(ema.buffers()), src_buffers)
        return betas[0]

    def state_dict(self) -> dict:
        return self.profiles[0].state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.profiles[0].load_state_dict(state)

    def extra_state(self) -> dict[str, Any]:
        """The checkpoint's ``ema_power`` entry: the σ_rels and the state dicts of profiles 1.. (0 is ``ema``)."""
        return {"sigma_rels": list(self.sigma_rels), "profiles": [p.state_dict() for p in self.profiles[1:]]}

    def load_extra_state(self, extra: Mapping[str, Any]) -> None:
        saved = [float(s) for s in extra["sigma_rels"]]
        if saved != self.sigma_rels:
            raise ValueError(f"the checkpoint tracks EMA profiles σ_rel = {saved}, this run {self.sigma_rels}")
        for profile, state in zip(self.profiles[1:], extra["profiles"], strict=True):
            profile.load_state_dict(state)

    def save_snapshots(self, run_dir: str | os.PathLike, cur_nimg: int, step: int, batch: int, dtype: str,
                       config: Mapping[str, Any], geometry: Mapping[str, Any]) -> list[Path]:
        """Write every profile at ``cur_nimg`` to ``<run_dir>/ema_snapshots/`` (atomically, in ``dtype``)."""
        if dtype not in SNAPSHOT_DTYPES:
            raise ValueError(f"train.ema_snapshot_dtype: must be one of {', '.join(SNAPSHOT_DTYPES)}, got {dtype!r}")
        cast = SNAPSHOT_DTYPES[dtype]
        paths = []
        for sigma_rel, gamma, ema in zip(self.sigma_rels, self.gammas, self.profiles, strict=True):
            params = {n: _cast(p, cast) for n, p in ema.named_parameters()}
            buffers = {n: b.detach().cpu().clone() for n, b in ema.named_buffers()}
            payload = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "cur_nimg": int(cur_nimg),
                       "step": int(step), "batch": int(batch), "sigma_rel": sigma_rel, "gamma": gamma,
                       "dtype": dtype, "params": params, "buffers": buffers, "config": dict(config),
                       "geometry": dict(geometry)}
            path = Path(run_dir) / SNAPSHOT_DIR / snapshot_name(cur_nimg, sigma_rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path, "wb") as f:
                torch.save(payload, f)
            paths.append(path)
        return paths


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach()
    return (t.to(dtype) if t.is_floating_point() else t).cpu().clone()


def build_ema(model: nn.Module, train_cfg: Any) -> Any:
    """The run's EMA from ``train.ema``: ``halflife`` (EDM's, ``training.ema.EMA``) or ``power`` (EDM2's)."""
    from training.ema import EMA

    kind = train_cfg.get("ema", "halflife") if hasattr(train_cfg, "get") else "halflife"
    if kind == "halflife":
        return EMA(model, halflife_kimg=train_cfg.ema_halflife_kimg, rampup_ratio=train_cfg.ema_rampup_ratio)
    if kind == "power":
        return PowerFunctionEMA(model, list(train_cfg.ema_sigma_rels))
    raise ValueError(f"train.ema: must be one of {', '.join(EMA_KINDS)}, got {kind!r}")


# --- snapshot files -------------------------------------------------------------------------------------------------

def snapshot_name(cur_nimg: int, sigma_rel: float) -> str:
    return f"phema-{int(cur_nimg):010d}-{float(sigma_rel):.10g}.pt"


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file: the profile σ_rel (and its γ) at ``nimg`` images seen."""

    nimg: int
    sigma_rel: float
    path: Path

    @property
    def gamma(self) -> float:
        return sigma_rel_to_gamma(self.sigma_rel)


def snapshot_dir(path: str | os.PathLike) -> Path:
    """The snapshot directory of a run directory, of a checkpoint file (its run's), or the directory itself."""
    path = Path(path)
    if path.is_file():  # <run>/checkpoints/checkpoint-*.pt, or <run>/ema.safetensors
        path = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if path.name != SNAPSHOT_DIR:
        path = path / SNAPSHOT_DIR
    return path


def list_snapshots(path: str | os.PathLike) -> list[Snapshot]:
    """The EMA snapshots of a run (run dir, checkpoint or snapshot dir), oldest first."""
    directory = snapshot_dir(path)
    if not directory.is_dir():
        return []
    found = [Snapshot(int(m.group(1)), float(m.group(2)), p) for p in directory.iterdir()
             if (m := _NAME_RE.match(p.name))]
    return sorted(found, key=lambda s: (s.nimg, s.sigma_rel))


def load_snapshot(path: str | os.PathLike) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path} is not a sigmalab EMA snapshot (missing format tag '{SNAPSHOT_FORMAT}')")
    if state.get("version") != SNAPSHOT_VERSION:
        raise ValueError(f"{path} has EMA snapshot version {state.get('version')}; this sigmalab reads "
                         f"{SNAPSHOT_VERSION}")
    return state


# --- reconstruction -------------------------------------------------------------------------------------------------

def profile_inner_products(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """⟨p_a, p_b⟩ of power-function profiles, for every pair (rows a, columns b), in float64 (module docstring)."""
    t_a, g_a = np.asarray(t_a, np.float64)[:, None], np.asarray(gamma_a, np.float64)[:, None]
    t_b, g_b = np.asarray(t_b, np.float64)[None, :], np.asarray(gamma_b, np.float64)[None, :]
    g_sum = g_a + g_b + 1.0
    log_m = np.log(np.minimum(t_a, t_b))
    log_ip = (np.log(g_a + 1.0) + np.log(g_b + 1.0) - np.log(g_sum) + g_sum * log_m
              - (g_a + 1.0) * np.log(t_a) - (g_b + 1.0) * np.log(t_b))
    return np.exp(log_ip)


def solve_posthoc_coefficients(t_in: Sequence[float], gamma_in: Sequence[float], t_out: Sequence[float],
                               gamma_out: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coefficients x [n_in, n_out] with Σᵢ xᵢⱼ·p_in,i ≈ p_out,j, and each fit's relative residual.

    Times in any unit (only ratios matter); every input profile must end no later than the outputs it is used for.
    """
    t_in, g_in = np.asarray(t_in, np.float64), np.asarray(gamma_in, np.float64)
    t_out, g_out = np.asarray(t_out, np.float64), np.asarray(gamma_out, np.float64)
    if t_in.size == 0:
        raise ValueError("no EMA snapshots to reconstruct from")
    scale = float(t_out.max())
    t_in, t_out = t_in / scale, t_out / scale
    gram = profile_inner_products(t_in, g_in, t_in, g_in)
    rhs = profile_inner_products(t_in, g_in, t_out, g_out)
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    target_sq = np.diag(profile_inner_products(t_out, g_out, t_out, g_out))
    resid_sq = np.einsum("ij,ik,kj->j", x, gram, x) - 2.0 * np.einsum("ij,ij->j", x, rhs) + target_sq
    return x, np.sqrt(np.clip(resid_sq, 0.0, None) / target_sq)


def reconstruct(path: str | os.PathLike, sigma_rels: Sequence[float], at_nimg: int | None = None
                ) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """State dicts (float32 parameters, the newest snapshot's buffers) of the power-function EMAs ``sigma_rels`` at
    ``at_nimg`` (default: the newest snapshot; otherwise the newest snapshot time ≤ at_nimg), reading each snapshot
    once. Returns (state dicts, info: snapshot time, number of snapshots, coefficients' fit residual per σ_rel,
    the run's config and geometry)."""
    snaps = list_snapshots(path)
    if not snaps:
        raise FileNotFoundError(f"no EMA snapshots in {snapshot_dir(path)}: post-hoc EMA needs a run trained with "
                                "train.ema=power (snapshots every train.ema_snapshot_kimg)")
    gammas_out = [sigma_rel_to_gamma(s) for s in sigma_rels]
    times = sorted({s.nimg for s in snaps})
    eligible = [t for t in times if at_nimg is None or t <= at_nimg]
    if not eligible:
        raise ValueError(f"no EMA snapshot at or before {at_nimg / 1000:g} kimg in {snapshot_dir(path)} (snapshots: "
                         f"{', '.join(f'{t / 1000:g}' for t in times)} kimg)")
    t_r = eligible[-1]
    used = [s for s in snaps if s.nimg <= t_r]
    coeffs, residual = solve_posthoc_coefficients([s.nimg for s in used], [s.gamma for s in used],
                                                  [t_r] * len(gammas_out), gammas_out)
    outs: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    newest: dict[str, Any] = {}
    for i, snap in enumerate(used):
        state = load_snapshot(snap.path)
        for j, out in enumerate(outs):
            w = float(coeffs[i, j])
            for name, tensor in state["params"].items():
                term = tensor.to(torch.float32) * w
                out[name] = term if name not in out else out[name].add_(term)
        if snap.nimg == t_r:
            newest = state
    for out in outs:
        out.update({name: b.clone() for name, b in newest["buffers"].items()})
    info = {"at_nimg": t_r, "num_snapshots": len(used), "tracked_sigma_rels": sorted({s.sigma_rel for s in used}),
            "fit_residual": [float(r) for r in residual], "config": newest["config"],
            "geometry": newest["geometry"]}
    return outs, info


def load_posthoc_denoiser(path: str | os.PathLike, sigma_rel: float, at_kimg: float | None = None,
                          device: str | torch.device = "cpu") -> tuple[nn.Module, Any, dict[str, Any]]:
    """The denoiser of a run with the post-hoc EMA ``sigma_rel`` at ``at_kimg`` (default: the newest snapshot, or
    the checkpoint's time when ``path`` is a checkpoint file); returns (denoiser, run config, info)."""
    from omegaconf import OmegaConf

    from training.denoiser import denoiser_from_geometry

    if at_kimg is None and Path(path).is_file():
        m = re.match(r"^checkpoint-(\d{10})\.pt$", Path(path).name)
        at_kimg = int(m.group(1)) / 1000 if m else None
    at_nimg = None if at_kimg is None else int(round(float(at_kimg) * 1000))
    (state,), info = reconstruct(path, [sigma_rel], at_nimg)
    cfg = OmegaConf.create(info.pop("config"))
    geometry = info.pop("geometry")
    denoiser = denoiser_from_geometry(cfg, geometry)
    denoiser.load_state_dict(state)
    info.update(sigma_rel=float(sigma_rel), gamma=sigma_rel_to_gamma(sigma_rel), at_kimg=info["at_nimg"] / 1000,
                fit_residual=info["fit_residual"][0])
    return denoiser.eval().requires_grad_(False).to(device), cfg, info


# --- the entry points' `ema` key ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EMAChoice:
    """What ``ema=...`` asks of sample.py / evaluate.py: raw weights (``use_ema`` False), the checkpoint's EMA, or a
    post-hoc EMA (``sigma_rel``) at ``at_kimg``; ``sigma_rels`` is the list of an EMA sweep."""

    use_ema: bool = True
    sigma_rel: float | None = None
    at_kimg: float | None = None
    sigma_rels: tuple[float, ...] = ()

    @property
    def posthoc(self) -> bool:
        return self.sigma_rel is not None


def ema_choice(value: Any) -> EMAChoice:
    """Parse the ``ema`` key: ``true`` / ``false`` (as before) or ``{sigma_rel, at_kimg, sigma_rels}`` (post-hoc)."""
    if value is None or isinstance(value, bool):
        return EMAChoice(use_ema=value is not False)
    if not isinstance(value, Mapping) and not hasattr(value, "items"):
        raise ValueError(f"ema: must be true, false or ema.sigma_rel=<σ_rel> [ema.at_kimg=<kimg>], got {value!r}")
    value = dict(value.items())
    unknown = sorted(set(value) - {"sigma_rel", "at_kimg", "sigma_rels"})
    if unknown:
        raise ValueError(f"ema: unknown key(s) {', '.join(unknown)}; valid: sigma_rel, at_kimg, sigma_rels")
    sigma_rel, at_kimg = value.get("sigma_rel"), value.get("at_kimg")
    if sigma_rel is not None:
        sigma_rel_to_gamma(float(sigma_rel))  # range check, with the valid range in the message
    if at_kimg is not None and not (isinstance(at_kimg, (int, float)) and at_kimg > 0):
        raise ValueError(f"ema.at_kimg: must be a number > 0 (kimg of a snapshot), got {at_kimg!r}")
    sigma_rels = tuple(float(s) for s in (value.get("sigma_rels") or ()))
    for s in sigma_rels:
        sigma_rel_to_gamma(s)
    return EMAChoice(True, None if sigma_rel is None else float(sigma_rel),
                     None if at_kimg is None else float(at_kimg), sigma_rels)
