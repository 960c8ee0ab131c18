"""Network preconditioning: the denoiser D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)).

Karras et al. (2022), Table 1. F is the raw network; the four coefficients decide what F effectively predicts and
keep its inputs and targets at unit variance. The training target of F is F* = (y − c_skip·x)/c_out, and an x₀-space
loss weight w(σ) (``diffusion.weighting``) puts the weight w·c_out² on ‖F − F*‖².

| precond | c_skip          | c_out              | c_in            | c_noise          | F predicts                     |
|---------|-----------------|--------------------|-----------------|------------------|--------------------------------|
| edm     | σ_d²/(σ²+σ_d²)  | σ·σ_d/√(σ²+σ_d²)   | 1/√(σ²+σ_d²)    | ¼·ln σ           | unit-variance mix of y and n   |
| vp      | 1               | −σ                 | 1/√(σ²+1)       | (M−1)·t_VP(σ)    | ε (Song et al.'s DDPM++ time)  |
| ve      | 1               | σ                  | 1               | ln(σ/2)          | −ε (σ × score; NCSN++)         |
| eps     | 1               | −σ                 | 1/√(σ²+1)       | ¼·ln σ           | ε                              |
| x0      | 0               | 1                  | 1/√(σ²+1)       | ¼·ln σ           | x₀ = y                         |
| v       | 1/(σ²+1)        | −σ/√(σ²+1)         | 1/√(σ²+1)       | ¼·ln σ           | v = α·ε − s·y                  |

with σ_d = σ_data and, for vp, t_VP(σ) the inverse of σ(t) = √(exp(½β_d t² + β_min t) − 1) (β_d = 19.9,
β_min = 0.1, M = 1000; ``diffusion.schedules.vp_ve``).

``eps``, ``x0`` and ``v`` are the plain prediction targets of the equivalent VP process x_vp = x/√(1+σ²) = α·y + s·n,
α = 1/√(1+σ²), s = σ/√(1+σ²) (the logSNR convention λ = −2 ln σ of ``diffusion.noise_levels``, no σ_data): the
network sees x_vp (c_in = α) and its output is turned into D by
    ε:  D = x − σ·ε̂                    (x = y + σ·n)
    x₀: D = x̂₀
    v:  D = α·x_vp − s·v̂ = x/(1+σ²) − σ/√(1+σ²)·v̂   (since α·x_vp − s·v = α²y + αs·n − αs·n + s²y = y)
They take EDM's noise embedding c_noise = ¼·ln σ so that only the target differs from ``edm``. With the matching
weighting (``weighting=eps_mse / x0_mse / v_mse``) the effective weight on ‖F − F*‖² is w·c_out² = 1, i.e. plain
MSE on that target: "ε, x₀ or v prediction with plain MSE" = ``precond=<target> weighting=<target>_mse``.
(``vp`` is ``eps`` with Song et al.'s continuous-time noise label, exactly EDM's VPPrecond; ``v`` is ``edm`` with
σ_d = 1 and the sign of c_out flipped.)

``sigma_data`` is accepted by every preconditioner (the config group carries it for the EDM loss weight) and used by
``edm`` only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from configs import build_from_registry
from diffusion.schedules.vp_ve import vp_sigma_inv


class Preconditioner(nn.Module):
    """Wraps a network F into a denoiser D(x; σ); subclasses define ``coefficients(σ)``."""

    name = "base"

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"precond.sigma_data must be > 0, got {sigma_data}")
        self.net = net
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at noise level σ (broadcastable tensors)."""
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        """D(x; σ). ``x`` may be float64 (samplers); the network runs in float32 and D is returned in x's dtype."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        if sigma.shape[0] == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0], 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        net_dtype = torch.float32
        F = self.net((c_in * x).to(net_dtype), c_noise.flatten().to(net_dtype), class_labels=class_labels,
                     augment_labels=augment_labels)
        return c_skip * x + c_out * F.to(x.dtype)


class EDMPrecond(Preconditioner):
    """EDM's preconditioning (Karras et al. 2022, Table 1, column "ours")."""

    name = "edm"

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1.0 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4.0
        return c_skip, c_out, c_in, c_noise


class VPPrecond(Preconditioner):
    """EDM's VPPrecond (Karras et al. 2022, Table 1, column "VP"): ε-prediction with Song et al.'s time label."""

    name = "vp"

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, beta_d: float = 19.9, beta_min: float = 0.1,
                 num_timesteps: int = 1000):
        super().__init__(net, sigma_data=sigma_data)
        if not (beta_d >= 0 and beta_min >= 0 and beta_d + beta_min > 0):
            raise ValueError(f"precond=vp: need beta_d >= 0, beta_min >= 0, not both 0; got {beta_d}, {beta_min}")
        if not (isinstance(num_timesteps, int) and num_timesteps >= 2):
            raise ValueError(f"precond=vp: num_timesteps (EDM's M) must be an integer >= 2, got {num_timesteps!r}")
        self.beta_d, self.beta_min, self.num_timesteps = float(beta_d), float(beta_min), num_timesteps

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = torch.rsqrt(sigma**2 + 1.0)
        c_noise = (self.num_timesteps - 1) * vp_sigma_inv(sigma, self.beta_d, self.beta_min)
        return c_skip, c_out, c_in, c_noise


class VEPrecond(Preconditioner):
    """EDM's VEPrecond (Karras et al. 2022, Table 1, column "VE")."""

    name = "ve"

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = torch.log(0.5 * sigma)
        return c_skip, c_out, c_in, c_noise


class EpsPrecond(Preconditioner):
    """The network predicts ε of the equivalent VP process: D = x − σ·F(x/√(1+σ²))."""

    name = "eps"

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return torch.ones_like(sigma), -sigma, torch.rsqrt(sigma**2 + 1.0), sigma.log() / 4.0


class X0Precond(Preconditioner):
    """The network predicts x₀ directly: D = F(x/√(1+σ²))."""

    name = "x0"

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return torch.zeros_like(sigma), torch.ones_like(sigma), torch.rsqrt(sigma**2 + 1.0), sigma.log() / 4.0


class VPredPrecond(Preconditioner):
    """The network predicts v = α·ε − s·x₀ of the equivalent VP process: D = x/(1+σ²) − σ/√(1+σ²)·F."""

    name = "v"

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        alpha = torch.rsqrt(sigma**2 + 1.0)
        return alpha**2, -sigma * alpha, alpha, sigma.log() / 4.0


PRECONDITIONERS: dict[str, type[Preconditioner]] = {
    "edm": EDMPrecond,
    "vp": VPPrecond,
    "ve": VEPrecond,
    "eps": EpsPrecond,
    "x0": X0Precond,
    "v": VPredPrecond,
}


def build_preconditioner(precond_cfg: Any, net: nn.Module) -> Preconditioner:
    """Wrap ``net`` with the preconditioning named by ``precond_cfg.name``."""
    return build_from_registry("precond", PRECONDITIONERS, precond_cfg, net=net)
