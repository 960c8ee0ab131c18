"""Preconditionings against the identities of Karras et al. (2022), Table 1 / Appendix B.6, and the prediction targets
(ε, x₀, v) they make the network learn; every weighting × precond pair gives a finite loss over the sampler range."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from diffusion.preconditioning import PRECONDITIONERS, EDMPrecond, build_preconditioner
from diffusion.schedules import build_schedule
from diffusion.weighting import WEIGHTINGS, EDMWeighting, build_weighting
from models.edm2 import EDM2LogVar

ROOT_DIR = Path(__file__).resolve().parents[1]
SIGMAS = torch.tensor([0.002, 0.01, 0.1, 0.5, 1.0, 5.0, 80.0], dtype=torch.float64)


class ZeroNet(nn.Module):
    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        return torch.zeros_like(x)


class RecordingNet(nn.Module):
    """Returns a constant and records its inputs, to read the coefficients back out of D."""

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.last_x, self.last_noise = x.clone(), noise_labels.clone()
        return torch.ones_like(x)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_coefficients_identities(sigma_data):
    pre = EDMPrecond(ZeroNet(), sigma_data=sigma_data)
    c_skip, c_out, c_in, c_noise = pre.coefficients(SIGMAS)
    weight = EDMWeighting(sigma_data)(SIGMAS)
    sd2 = sigma_data**2
    # λ(σ)·c_out(σ)² = 1: unit effective weight on the network output (EDM Eq. 8 and B.6).
    torch.testing.assert_close(weight * c_out**2, torch.ones_like(SIGMAS), rtol=1e-12, atol=0)
    # Unit-variance network input: Var[c_in·(y + σn)] = c_in²·(σ_d² + σ²) = 1.
    torch.testing.assert_close(c_in**2 * (sd2 + SIGMAS**2), torch.ones_like(SIGMAS), rtol=1e-12, atol=0)
    # Unit-variance training target F* = (y − c_skip·(y + σn))/c_out: ((1−c_skip)²σ_d² + c_skip²σ²)/c_out² = 1.
    target_var = ((1 - c_skip) ** 2 * sd2 + c_skip**2 * SIGMAS**2) / c_out**2
    torch.testing.assert_close(target_var, torch.ones_like(SIGMAS), rtol=1e-12, atol=0)
    # c_skip minimises that variance: d/dc [(1−c)²σ_d² + c²σ²] = 0 at c = σ_d²/(σ² + σ_d²).
    torch.testing.assert_close(c_skip, sd2 / (sd2 + SIGMAS**2))
    torch.testing.assert_close(c_noise, SIGMAS.log() / 4)


def test_zero_network_is_exact_gaussian_denoiser():
    """With F ≡ 0, D = c_skip·x, which is E[y | x] for y ~ N(0, σ_data²) — checked by Monte Carlo regression."""
    sigma_data = 0.5
    pre = EDMPrecond(ZeroNet(), sigma_data=sigma_data)
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(200_000, 1, 1, 1, generator=gen, dtype=torch.float64) * sigma_data
    for sigma in [0.1, 0.5, 2.0]:
        x = y + sigma * torch.randn(y.shape, generator=gen, dtype=torch.float64)
        d = pre(x, torch.tensor(sigma, dtype=torch.float64))
        slope_mc = float((x * y).mean() / (x * x).mean())  # least-squares E[y|x] = a·x
        slope_d = float((d / x).mean())
        assert abs(slope_d - slope_mc) < 4e-3


def test_forward_passes_scaled_input_and_noise_label():
    net = RecordingNet()
    pre = EDMPrecond(net, sigma_data=0.5)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    d = pre(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(net.last_x.double(), x / (s**2 + 0.25).sqrt(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net.last_noise.double(), sigma.log() / 4, rtol=1e-6, atol=1e-6)
    expected = 0.25 / (s**2 + 0.25) * x + s * 0.5 / (s**2 + 0.25).sqrt()
    torch.testing.assert_close(d, expected, rtol=1e-6, atol=1e-6)
    assert d.dtype == torch.float64


def test_unknown_choices_name_valid_options():
    with pytest.raises(ValueError, match="valid choices: edm"):
        build_preconditioner({"name": "nope", "sigma_data": 0.5}, ZeroNet())
    with pytest.raises(ValueError, match="valid choices: edm"):
        build_weighting({"name": "nope"})
    with pytest.raises(ValueError, match="unknown parameter.*sigma_dat"):
        build_weighting({"name": "edm", "sigma_dat": 0.5})
    with pytest.raises(ValueError, match="sigma_data must be > 0"):
        EDMWeighting(-1.0)
    assert math.isfinite(float(EDMWeighting(0.5)(torch.tensor(80.0))))


# ---------------------------------------------------------------------------------------------------------------------
# The other preconditionings: each makes F predict the named target, and pairs with its plain-MSE weighting.


def _targets(y, n, s):
    """What F should predict under each preconditioning, written from the definitions (VP process α·y + s·n)."""
    alpha, sv = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
    return {"eps": n, "vp": n, "ve": -n, "x0": y, "v": alpha * n - sv * y}


@pytest.mark.parametrize("name", ["eps", "vp", "ve", "x0", "v"])
def test_network_target_is_the_named_prediction_target(name):
    pre = build_preconditioner({"name": name, "sigma_data": 0.5}, ZeroNet())
    gen = torch.Generator().manual_seed(0)
    s = SIGMAS.reshape(-1, 1)
    y = 0.5 * torch.randn(len(SIGMAS), 32, generator=gen, dtype=torch.float64)
    n = torch.randn(len(SIGMAS), 32, generator=gen, dtype=torch.float64)
    x = y + s * n
    c_skip, c_out, c_in, _ = (c.reshape(-1, 1) for c in pre.coefficients(s.flatten()))
    target = (y - c_skip * x) / c_out  # F* such that D = c_skip·x + c_out·F* = y
    torch.testing.assert_close(target, _targets(y, n, s)[name], rtol=1e-9, atol=1e-9)
    if name != "ve":  # the VP-style inputs are the VP process x/√(1+σ²): unit variance for unit-variance data
        torch.testing.assert_close(c_in**2 * (1.0 + s**2), torch.ones_like(s), rtol=1e-12, atol=0)


@pytest.mark.parametrize(("precond", "weighting"), [("eps", "eps_mse"), ("x0", "x0_mse"), ("v", "v_mse"),
                                                    ("vp", "eps_mse"), ("ve", "eps_mse")])
def test_target_with_its_mse_weighting_is_plain_mse(precond, weighting):
    """w(σ)·c_out(σ)² = 1: the x₀-space weight is exactly plain MSE on the network output."""
    pre = build_preconditioner({"name": precond, "sigma_data": 0.5}, ZeroNet())
    _, c_out, _, _ = pre.coefficients(SIGMAS)
    w = build_weighting({"name": weighting})(SIGMAS)
    torch.testing.assert_close(w * c_out**2, torch.ones_like(SIGMAS), rtol=1e-12, atol=0)


def test_v_precond_is_edm_with_unit_sigma_data_and_flipped_output():
    v = build_preconditioner({"name": "v", "sigma_data": 0.5}, ZeroNet()).coefficients(SIGMAS)
    edm1 = EDMPrecond(ZeroNet(), sigma_data=1.0).coefficients(SIGMAS)
    torch.testing.assert_close(v[0], edm1[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(v[1], -edm1[1], rtol=1e-14, atol=0)
    torch.testing.assert_close(v[2], edm1[2], rtol=1e-14, atol=0)
    torch.testing.assert_close(v[3], edm1[3], rtol=1e-14, atol=0)


def test_vp_and_ve_noise_labels():
    """VP: c_noise = (M−1)·t with σ(t) = √(exp(½β_d t² + β_min t) − 1); VE: c_noise = ln(σ/2) (EDM Table 1)."""
    vp = build_preconditioner({"name": "vp", "sigma_data": 0.5, "beta_d": 19.9, "beta_min": 0.1,
                               "num_timesteps": 1000}, ZeroNet())
    c_noise = vp.coefficients(SIGMAS)[3]
    t = c_noise / 999
    torch.testing.assert_close(torch.sqrt(torch.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1), SIGMAS, rtol=1e-9, atol=0)
    # EDM's VPPrecond range: σ(1e-5) ≈ 0.0010 → c_noise ≈ 0.00999, σ(1) ≈ 152.2 → c_noise = 999.
    ends = vp.coefficients(torch.tensor([math.sqrt(math.expm1(0.5 * 19.9e-10 + 0.1e-5)),
                                         math.sqrt(math.expm1(0.5 * 19.9 + 0.1))], dtype=torch.float64))[3]
    torch.testing.assert_close(ends, torch.tensor([999e-5, 999.0], dtype=torch.float64), rtol=1e-9, atol=0)
    ve = build_preconditioner({"name": "ve", "sigma_data": 0.5}, ZeroNet())
    torch.testing.assert_close(ve.coefficients(SIGMAS)[3], torch.log(SIGMAS / 2), rtol=1e-14, atol=0)


def test_forward_of_a_target_precond_feeds_the_vp_input():
    net = RecordingNet()
    pre = build_preconditioner({"name": "v", "sigma_data": 0.5}, net)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    d = pre(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(net.last_x.double(), x / (1 + s**2).sqrt(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net.last_noise.double(), sigma.log() / 4, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d, x / (1 + s**2) - s / (1 + s**2).sqrt(), rtol=1e-6, atol=1e-6)


class TinyNet(nn.Module):
    """A small real network with the sigmalab interface: two convolutions, FiLM-style noise conditioning."""

    def __init__(self, channels: int = 3, hidden: int = 8):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.emb = nn.Linear(1, hidden)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        h = self.conv_in(x) + self.emb(noise_labels.reshape(-1, 1))[:, :, None, None]
        return self.conv_out(torch.nn.functional.silu(h))


def _weighting_cfg(name: str) -> dict:
    if name == "importance":
        return {"name": name, "target": {"name": "edm", "sigma_data": 0.5}, "reference": {"name": "cosine"}}
    if name in ("edm", "soft_min_snr"):
        return {"name": name, "sigma_data": 0.5}
    return {"name": name}


@pytest.mark.parametrize("precond", sorted(PRECONDITIONERS))
def test_every_weighting_gives_a_finite_loss_at_the_sampler_range(precond):
    torch.manual_seed(0)
    pre = build_preconditioner({"name": precond, "sigma_data": 0.5}, TinyNet())
    gen = torch.Generator().manual_seed(1)
    y = 0.5 * torch.randn(2, 3, 8, 8, generator=gen)
    n = torch.randn(y.shape, generator=gen)
    schedule = build_schedule({"name": "lognormal"})
    for wname in sorted(WEIGHTINGS):
        # EDM2's learned weighting gets its u(σ) module from the trainer; here a freshly initialised one.
        extra = {"uncertainty": EDM2LogVar(128)} if wname == "edm2_uncertainty" else {}
        weighting = build_weighting(_weighting_cfg(wname), **extra)
        weighting.attach_schedule(schedule)
        for sigma_value in (0.002, 80.0):
            pre.zero_grad()
            sigma = torch.full((2,), sigma_value)
            d = pre(y + sigma.reshape(-1, 1, 1, 1) * n, sigma)
            loss = (weighting(sigma) * (d - y).square().flatten(1).sum(1)).mean()
            loss.backward()
            assert torch.isfinite(loss), f"precond={precond} weighting={wname} σ={sigma_value}: loss {loss}"
            grads = [p.grad for p in pre.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads), (precond, wname, sigma_value)


PRECOND_FILES = sorted((ROOT_DIR / "configs/precond").glob("*.yaml"))


@pytest.mark.parametrize("path", PRECOND_FILES, ids=lambda p: p.stem)
def test_precond_configs_build(path):
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem and "sigma_data" in cfg
    pre = build_preconditioner(cfg, ZeroNet())
    c_skip, c_out, c_in, c_noise = pre.coefficients(SIGMAS)
    assert all(torch.isfinite(c).all() for c in (c_skip, c_out, c_in, c_noise))
