"""Loss weightings w(σ): the training loss is E_σ[ w(σ)·‖D(y + σn; σ) − y‖² ] with σ drawn from the schedule.

Every weight here is expressed in **denoiser (x₀) space**, i.e. it multiplies the error of D against the clean data
y, whatever the network's own prediction target. This is the convention of EDM (Karras et al. 2022, Eq. 2 and
Table 1) and the one InfoNoise's divide-by-weight step needs.

EDM:  λ(σ) = (σ² + σ_data²) / (σ·σ_data)²,  which makes the effective weight on the network output c_out(σ)²·λ(σ) = 1.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from configs import build_from_registry


class LossWeighting:
    """A loss weight w(σ) in x₀ space; subclasses implement ``__call__``."""

    name = "base"

    def __call__(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class EDMWeighting(LossWeighting):
    """λ(σ) = (σ² + σ_data²) / (σ·σ_data)²."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5):
        if not sigma_data > 0:
            raise ValueError(f"weighting.sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def __call__(self, sigma: Tensor) -> Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


WEIGHTINGS: dict[str, type[LossWeighting]] = {
    "edm": EDMWeighting,
}


def build_weighting(weighting_cfg: Any) -> LossWeighting:
    """Build the weighting named by ``weighting_cfg.name``."""
    return build_from_registry("weighting", WEIGHTINGS, weighting_cfg)
