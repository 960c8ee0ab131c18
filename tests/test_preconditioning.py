"""EDM preconditioning and loss weighting against the identities of Karras et al. (2022), Table 1 / Appendix B.6."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusion.preconditioning import EDMPrecond, build_preconditioner
from diffusion.weighting import EDMWeighting, build_weighting

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
