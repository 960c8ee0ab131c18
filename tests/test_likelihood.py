"""Tests of diffusion/likelihood.py against closed forms.

- Gaussian data y ~ N(0, s²I) (and a rotated anisotropic Gaussian) with the exact denoiser: the ODE log-likelihood
  equals log N(x; 0, Σ + σ_min² I); Rademacher probes are exact for the isotropic case, and the Hutchinson error
  of either probe kind has the closed-form standard deviation derived in the module docstring.
- 8-bit data: the dequantised bits/dim equals the analytic bin average E_v[−log₂ p] + log₂ 127.5 and lies just above
  the exact discrete NLL −log₂ P(u) computed from Gaussian CDFs over the pixel bins (checks the scale constant).
- Binarized data: the ELBO with the exact denoiser a·tanh(a·x/σ²) of fair ±1 bits is 1 bit/dim (I-MMSE), 0.5 when
  half the pixels are constant, and a wrong denoiser gives more (it is a bound).
- Per-image seeds: results do not depend on the batch size; the vector-Jacobian trace through a real preconditioned
  network equals the trace of its Jacobian computed by torch.func.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from diffusion import likelihood as lk

SMIN, SMAX = 0.002, 80.0
LN2 = math.log(2)


def gaussian_logpdf(x: torch.Tensor, variances: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """log N(x; 0, Q diag(variances) Qᵀ) per row of x [N, d]."""
    z = x if basis is None else x @ basis
    return -0.5 * (torch.log(2 * math.pi * variances).sum() + (z.square() / variances).sum(1))


class LinearGaussianDenoiser(torch.nn.Module):
    """The exact denoiser of y ~ N(0, Q diag(s²) Qᵀ): D(x; σ) = Q diag(s²/(s²+σ²)) Qᵀ x (images flattened)."""

    def __init__(self, s2: torch.Tensor, basis: torch.Tensor | None = None):
        super().__init__()
        self.s2, self.basis = s2, basis

    def forward(self, x, sigma, class_labels=None):
        flat = x.flatten(1)
        gain = self.s2 / (self.s2 + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2)
        if self.basis is None:
            return (gain * flat).reshape(x.shape)
        return (((flat @ self.basis) * gain) @ self.basis.T).reshape(x.shape)


def path_matrix_diag(s2: torch.Tensor) -> torch.Tensor:
    """m_i = ∫_{ln σmin}^{ln σmax} s_i²/(s_i²+σ²) d ln σ (the eigenvalues of M in the module docstring)."""
    return math.log(SMAX / SMIN) - 0.5 * torch.log((s2 + SMAX**2) / (s2 + SMIN**2))


def test_isotropic_gaussian_matches_analytic_likelihood():
    s, shape, n = 0.3, (3, 4, 4), 64  # s != σ_data = 0.5: the integration variable x/√(σ² + σ_d²) is not constant
    d = math.prod(shape)
    x = s * torch.randn(n, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s2 = torch.full((d,), s * s, dtype=torch.float64)
    den = LinearGaussianDenoiser(s2)
    exact = gaussian_logpdf(x.flatten(1), s2 + SMIN**2)
    seeds = range(100, 100 + n)
    rad = lk.ode_log_likelihood(den, x, seeds=seeds, probe="rademacher")  # adaptive RK45, tolerance 1e-5
    # Rademacher probes are exact when ∂D/∂x is a multiple of I: left are the solver error and the prior mismatch
    # (N(0, σ_max²) for N(0, s² + σ_max²): below s²/(2σ_max² ln 2) = 1e-5 bits/dim).
    err_bpd = (rad.log_prob - exact) / (d * LN2)
    assert err_bpd.abs().max() < 2e-4, err_bpd.abs().max()
    assert 40 < float(rad.nfe.float().mean()) < 200
    # Gaussian probes: error (‖ε‖²/K − d)·m per image, std m·√(2d/K) nats; mean over n images within 4 std errors.
    for k in (1, 4):
        gau = lk.ode_log_likelihood(den, x, seeds=seeds, probe="gaussian", num_probes=k)
        err = gau.log_prob - rad.log_prob  # the probe error alone (same trajectory up to the solver tolerance)
        std = float(path_matrix_diag(s2[:1])) * math.sqrt(2 * d / k)
        assert abs(float(err.mean())) < 4 * std / math.sqrt(n)
        assert 0.7 < float(err.std()) / std < 1.3  # the closed-form spread is the observed one
    # The fixed-step Heun solver: second order (error / 4 per doubling of the steps), 1e-4 bits/dim at 128 steps.
    errs = [float(((lk.ode_log_likelihood(den, x[:8], seeds=range(8), solver="heun", num_steps=k).log_prob
                    - exact[:8]) / (d * LN2)).abs().max()) for k in (32, 64, 128)]
    assert errs[2] < 1e-4 and 3 < errs[0] / errs[1] < 5.5, errs


def test_anisotropic_gaussian_and_hutchinson_variance():
    d, n = 12, 300
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s2 = torch.logspace(-2, 0.5, d, dtype=torch.float64)
    den = LinearGaussianDenoiser(s2, basis)
    x = ((torch.randn(n, d, generator=g, dtype=torch.float64) * s2.sqrt()) @ basis.T).reshape(n, 1, 3, 4)
    exact = gaussian_logpdf(x.flatten(1), s2 + SMIN**2, basis)
    m = basis @ torch.diag(path_matrix_diag(s2)) @ basis.T  # M = ∫ ∂D/∂x d ln σ (independent of the trajectory)
    frob2, diag2 = float(m.square().sum()), float(m.diagonal().square().sum())
    predicted = {"gaussian": math.sqrt(2 * frob2), "rademacher": math.sqrt(2 * (frob2 - diag2))}
    for probe, std in predicted.items():
        res = lk.ode_log_likelihood(den, x, seeds=range(n), probe=probe)
        err = res.log_prob - exact
        assert abs(float(err.mean())) < 4 * std / math.sqrt(n) + 1e-3 * d, (probe, float(err.mean()))
        assert 0.8 < float(err.std()) / std < 1.2, (probe, float(err.std()), std)


def test_dequantized_bits_per_dim_on_the_pixel_scale():
    s, n, shape = 0.5, 48, (1, 4, 4)
    d = math.prod(shape)
    g = torch.Generator().manual_seed(2)
    y = (s * torch.randn(n, *shape, generator=g, dtype=torch.float64) * 127.5 + 128).floor().clamp(0, 255)
    images = y.to(torch.uint8)
    den = LinearGaussianDenoiser(torch.full((d,), s * s, dtype=torch.float64))
    bpd = lk.nll_bits_per_dim(den, images, seeds=range(n), method="ode", batch_size=16)
    tau2 = s * s + SMIN**2
    lo = (images.double().flatten(1) - 128) / 127.5  # the bin of u in model space: [lo, lo + 1/127.5)
    width = 1 / 127.5
    # Analytic E_v[−log p(lo + v·width)] for the Gaussian: E[(lo + w)²] = (lo + width/2)² + width²/12.
    centre = lo + width / 2
    mean_nll = 0.5 * math.log(2 * math.pi * tau2) + (centre.square() + width**2 / 12) / (2 * tau2)
    expected = mean_nll.sum(1) / (d * LN2) + math.log2(127.5)
    diff = bpd - expected  # one draw of v per image: zero mean
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(n) + 1e-5
    # The exact discrete NLL from the Gaussian CDF over each bin: the dequantised value bounds it from above, tightly.
    tau = math.sqrt(tau2)
    prob = norm.cdf(((lo + width) / tau).numpy()) - norm.cdf((lo / tau).numpy())
    discrete = torch.from_numpy(-(torch.log2(torch.from_numpy(prob))).sum(1).numpy() / d)
    gap = expected - discrete
    assert bool((gap >= 0).all()) and float(gap.max()) < 1e-4, gap
    # The scale constant matters at this precision: log2(128) instead of log2(127.5) would be 5.6e-3 off.
    assert abs(float(bpd.mean() - discrete.mean())) < 2e-3


def _two_point_images(n, shape, g, fixed_fraction=0.0):
    y = torch.randint(0, 2, (n, *shape), generator=g).double() * 2 - 1
    mask = torch.zeros(shape, dtype=torch.bool)
    k = int(round(fixed_fraction * mask.numel()))
    mask.view(-1)[:k] = True
    y[:, mask] = 1.0
    return y, mask


def test_binary_elbo_of_fair_bits_is_one_bit_per_dim():
    n, shape = 1024, (1, 2, 4)
    g = torch.Generator().manual_seed(3)
    for fixed, expected in ((0.0, 1.0), (0.5, 0.5)):
        y, mask = _two_point_images(n, shape, g, fixed)

        def exact(x, sigma, class_labels=None, mask=mask):
            # E[y | x] for independent fair ±1 pixels (tanh(x/σ²)) and constant +1 pixels.
            return torch.where(mask, torch.ones_like(x), torch.tanh(x / sigma**2))

        res = lk.binary_elbo(exact, y, seeds=range(n), num_steps=128)
        bpd = res.total / (y[0].numel() * LN2)
        se = float(bpd.std()) / math.sqrt(n)
        assert abs(float(bpd.mean()) - expected) < 4 * se, (fixed, float(bpd.mean()), se)
        assert se < 0.01
        # KL to the prior is ‖y‖²/(2σ_max²) = d/12800 nats; the decoder term vanishes at σ_min = 0.002.
        assert torch.allclose(res.prior, torch.full((n,), y[0].numel() / (2 * SMAX**2), dtype=torch.float64))
        assert float(res.reconstruction.max()) < 1e-12
    # A wrong (under-confident) denoiser pays for its error: the bound rises clearly above the 1 bit of entropy.
    y, _ = _two_point_images(256, shape, g)
    worse = lk.binary_elbo(lambda x, s, class_labels=None: torch.tanh(0.3 * x / s**2), y, seeds=range(256),
                           num_steps=64)
    bpd = worse.total / (y[0].numel() * LN2)
    assert float(bpd.mean()) > 1.0 + 4 * float(bpd.std()) / math.sqrt(256)


def test_per_image_seeds_make_batches_irrelevant():
    n, shape = 10, (1, 4, 4)
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    den = LinearGaussianDenoiser(torch.full((16,), 0.25, dtype=torch.float64))
    kw = dict(seeds=range(7, 7 + n), method="ode", tolerance=1e-3, probe="gaussian", num_probes=2)
    a = lk.nll_bits_per_dim(den, images, batch_size=3, **kw)
    b = lk.nll_bits_per_dim(den, images, batch_size=10, **kw)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    c = lk.nll_bits_per_dim(den, images[4:], batch_size=4, **{**kw, "seeds": range(11, 7 + n)})
    assert torch.allclose(a[4:], c, rtol=0, atol=1e-12)
    binary = (images >= 128).to(torch.uint8) * 255
    e1 = lk.nll_bits_per_dim(lambda x, s, class_labels=None: torch.tanh(x / s**2), binary, seeds=range(n),
                             method="elbo", num_steps=8, batch_size=3)
    e2 = lk.nll_bits_per_dim(lambda x, s, class_labels=None: torch.tanh(x / s**2), binary, seeds=range(n),
                             method="elbo", num_steps=8, batch_size=10)
    assert torch.allclose(e1, e2, rtol=0, atol=1e-12)


def test_elbo_from_the_sampler_sigma_min_extends_the_default_bound():
    """The bound from σ_min_low = 0.002 beside the one from 0.2: the latter is unchanged by computing the former, and
    for the denoiser D ≡ 0 (error ‖y‖² = d at every σ) the extra diffusion term is ∫ d/σ² d ln σ = d/2·(1/a² − 1/b²)
    over [a, b] = [0.002, 0.2], and the decoder term at a is E softplus(−2(1 + a·n)/a²)·d ≈ 0."""
    n, shape = 16, (1, 4, 4)
    d = 16
    images = (torch.randint(0, 2, (n, *shape), generator=torch.Generator().manual_seed(6)) * 255).to(torch.uint8)
    zero = lambda x, s, class_labels=None: torch.zeros_like(x)  # noqa: E731
    kw = dict(seeds=range(n), method="elbo", sigma_min=0.2, sigma_max=80.0, num_steps=128)
    plain = lk.nll_bits_per_dim(zero, images, **kw)
    info: dict = {}
    main = lk.nll_bits_per_dim(zero, images, info=info, elbo_sigma_min_low=0.002, **kw)
    assert torch.equal(main, plain)  # the default bound's draws come first in every image's stream
    assert lk.low_strata(0.002, 0.2, 80.0, 128) == 99 and info["nfe"] == 128 + 99
    extra = info["low_bpd"] - main  # bits/dim: diffusion on [0.002, 0.2] + decoder(0.002) − decoder(0.2)
    closed = 0.5 * d * (1 / 0.002**2 - 1 / 0.2**2) / (d * LN2)
    assert float(extra.mean()) == pytest.approx(closed, rel=2e-2)
    assert info["terms_bpd"]["diffusion_low"] == pytest.approx(closed, rel=2e-2)
    assert info["terms_bpd"]["reconstruction_low"] < 1e-12
    with pytest.raises(ValueError, match="sigma_min_low < sigma_min"):
        lk.binary_elbo(zero, images.double() / 127.5 - 1, seeds=range(n), sigma_min=0.2, sigma_min_low=0.5)


def test_vjp_trace_through_a_real_network_matches_its_jacobian():
    from omegaconf import OmegaConf

    from tests.helpers import compose
    from training.denoiser import build_denoiser

    cfg = compose("train", ["model=unet_tiny", "model.model_channels=8", "model.num_blocks=1"])
    torch.manual_seed(0)
    den = build_denoiser(cfg, 8, 1)
    with torch.no_grad():  # SongUNet zero-initialises its output layer: perturb so that ∂D/∂x is not just c_skip·I
        for p in den.parameters():
            p.add_(0.05 * torch.randn_like(p))
    den = den.eval().requires_grad_(False)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sigma = torch.tensor(0.7, dtype=torch.float64)
    basis = torch.eye(64, dtype=torch.float64).reshape(64, 1, 1, 8, 8).expand(64, 2, 1, 8, 8)
    _, quad = lk._drift_and_divergence(den, x, sigma, basis, None)  # mean of e_jᵀ J e_j over j = tr J / d
    for i in range(2):
        jac = torch.func.jacrev(lambda z: den(z[None], sigma)[0])(x[i]).reshape(64, 64)
        assert float(quad[i]) * 64 == pytest.approx(float(jac.trace()), rel=1e-5)
    assert OmegaConf.select(cfg, "precond.name") == "edm"


def test_input_errors():
    den = LinearGaussianDenoiser(torch.full((16,), 0.25, dtype=torch.float64))
    img = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="unknown eval.nll_method 'exact'.*ode, elbo"):
        lk.nll_bits_per_dim(den, img, seeds=[0, 1], method="exact")
    with pytest.raises(ValueError, match="unknown eval.nll_probe 'sphere'.*rademacher, gaussian"):
        lk.nll_bits_per_dim(den, img, seeds=[0, 1], probe="sphere")
    with pytest.raises(ValueError, match="needs binarized images"):
        lk.nll_bits_per_dim(den, img + 3, seeds=[0, 1], method="elbo")
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        lk.nll_bits_per_dim(den, torch.zeros(3, 1, 4, 4, dtype=torch.uint8), seeds=[0, 1])
    with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
        lk.ode_log_likelihood(den, img.double(), seeds=[0, 1], sigma_min=1.0, sigma_max=0.5)


def test_evaluate_likelihood_metrics_on_binary_digits():
    """evaluation.likelihood.likelihood_metrics: the ELBO of binarized data from eval.nll_elbo_sigma_min, seeds
    eval.seed + i."""
    from data import build_dataset
    from evaluation.likelihood import format_likelihood, likelihood_metrics
    from evaluation.settings import DEFAULT_EVAL
    from tests.helpers import compose

    cfg = compose("evaluate", ["data=binary_digits"])
    test = build_dataset(cfg.data, "test")

    class Tanh(torch.nn.Module):  # the fair-coin posterior mean; any denoiser will do for the plumbing
        label_dim = 0

        def forward(self, x, sigma, class_labels=None):
            return torch.tanh(x / sigma**2)

    settings = {**DEFAULT_EVAL, "nll_num_images": 6, "seed": 3, "nll_steps": 16}
    metrics, details = likelihood_metrics(Tanh(), cfg.data, settings, cfg.sampler, device="cpu")
    direct = lk.nll_bits_per_dim(Tanh(), test.all_images()[:6], seeds=range(3, 9), method="elbo", sigma_min=0.2,
                                 sigma_max=80.0, num_steps=16)
    assert details["method"] == "elbo" and details["sigma_min"] == 0.2 and details["num_images"] == 6
    assert metrics["nll_elbo_bpd"] == pytest.approx(float(direct.mean()), rel=1e-12)
    # Beside it, under its own name, the bound from the sampler's σ_min (0.002).
    info: dict = {}
    lk.nll_bits_per_dim(Tanh(), test.all_images()[:6], seeds=range(3, 9), method="elbo", sigma_min=0.2,
                        sigma_max=80.0, num_steps=16, elbo_sigma_min_low=0.002, info=info)
    assert details["sigma_min_low"] == 0.002
    assert metrics["nll_elbo_bpd_smin0.002"] == pytest.approx(float(info["low_bpd"].mean()), rel=1e-12)
    assert "nll_elbo_bpd_smin0.002 = " in format_likelihood(metrics, details)
    assert metrics["nll_elbo_bpd_sem"] == pytest.approx(float(direct.std()) / math.sqrt(6), rel=1e-9)
    terms = details["terms_bpd"]
    assert sum(terms.values()) == pytest.approx(metrics["nll_elbo_bpd"], rel=1e-9)
    with pytest.raises(ValueError, match="needs binarized images"):
        likelihood_metrics(Tanh(), compose("evaluate", ["data=digits"]).data,
                           {**settings, "nll_method": "elbo"}, cfg.sampler, device="cpu")
