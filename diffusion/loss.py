"""The denoising training loss, with the noise level drawn from a schedule and weighted by a loss weighting.

For a batch of clean data y (model space) the loss is, per sample i,

    σ_i ~ p(σ)            (the schedule)
    x_i = y_i + σ_i·n_i,   n_i ~ N(0, I)
    loss_i = w(σ_i)·‖D(x_i; σ_i) − y_i‖²      (summed over pixels, as EDM's training loop reduces it)

(a learned weighting adds its own term: ``LossWeighting.weighted_loss``, e.g. EDM2's + d·u(σ_i), in
``diffusion.weighting``).

The σ's of a batch are inverse-CDF draws of the schedule from uniforms that are i.i.d. (``sigma_draw="iid"``) or
stratified (``"stratified"``: one per equal-probability stratum, in random order; ``diffusion.schedules.base``): the
same marginal either way, with a much smaller batch-to-batch variance of the batch's σ's under stratification.

Next to the weighted loss it returns the per-sample *unweighted* error mse_i = ‖D(x_i; σ_i) − y_i‖², computed from D
and y directly (never by dividing the weighted loss by w, which is ill-conditioned at small σ): an adaptive schedule
(InfoNoise) estimates the MMSE profile from it, with no extra forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion.schedules import SIGMA_DRAWS, NoiseSchedule
from diffusion.weighting import LossWeighting


@dataclass
class LossOutput:
    loss: Tensor   # [B] weighted loss per sample, summed over dimensions (carries the graph)
    mse: Tensor    # [B] unweighted ‖D − y‖² per sample, summed over dimensions (detached)
    sigma: Tensor  # [B] the noise levels drawn


class DenoisingLoss:
    """E_σ[w(σ)·‖D(y + σn; σ) − y‖²] with σ ~ schedule."""

    def __init__(self, schedule: NoiseSchedule, weighting: LossWeighting, sigma_draw: str = "iid"):
        if sigma_draw not in SIGMA_DRAWS:
            raise ValueError(f"train.sigma_draw must be one of {', '.join(SIGMA_DRAWS)}, got {sigma_draw!r}")
        self.schedule = schedule
        self.weighting = weighting
        self.sigma_draw = sigma_draw

    def draw(self, batch: int, shape: tuple[int, ...], device: torch.device | str,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """σ ~ schedule (i.i.d. or stratified over the ``batch``), then unit noise n ~ N(0, I), for ``batch`` samples of
        ``shape``, drawn from ``generator``."""
        sigma = self.schedule.sample(batch, device=device, generator=generator,
                                     stratified=self.sigma_draw == "stratified")
        noise = torch.randn((batch, *shape), device=device, generator=generator)
        return sigma, noise

    def __call__(self, denoiser: nn.Module, images: Tensor, class_labels: Tensor | None = None,
                 augment_labels: Tensor | None = None, generator: torch.Generator | None = None,
                 sigma: Tensor | None = None, noise: Tensor | None = None) -> LossOutput:
        """The loss of a batch. σ and the unit noise are drawn here unless given (the training loop draws them for
        the whole global batch, so that results do not depend on how the batch is split over processes)."""
        if (sigma is None) != (noise is None):
            raise ValueError("give both sigma and noise, or neither")
        if sigma is None:
            sigma, noise = self.draw(images.shape[0], tuple(images.shape[1:]), images.device, generator)
        noisy = images + noise.to(images.dtype) * sigma.reshape(-1, 1, 1, 1)
        denoised = denoiser(noisy, sigma, class_labels=class_labels, augment_labels=augment_labels)
        sq_err = (denoised - images).square().flatten(1).sum(dim=1)
        loss = self.weighting.weighted_loss(sigma, sq_err, images[0].numel())
        return LossOutput(loss=loss, mse=sq_err.detach(), sigma=sigma)
