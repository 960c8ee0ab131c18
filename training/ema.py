"""Exponential moving average of the network weights, with EDM's half-life-in-images parameterisation.

Karras et al. (2022), training_loop: after each optimizer step with a global batch of B images,

    half-life h = ema_halflife_kimg·1000, capped at ema_rampup_ratio·cur_nimg during early training (ramp-up),
    β = 0.5^(B / max(h, 1e-8)),     θ_ema ← β·θ_ema + (1 − β)·θ.

Buffers (e.g. normalisation statistics) are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, halflife_kimg: float, rampup_ratio: float | None = 0.05):
        if not halflife_kimg >= 0:
            raise ValueError(f"train.ema_halflife_kimg must be >= 0, got {halflife_kimg}")
        if rampup_ratio is not None and not rampup_ratio > 0:
            raise ValueError(f"train.ema_rampup_ratio must be > 0 or null, got {rampup_ratio}")
        self.halflife_kimg = float(halflife_kimg)
        self.rampup_ratio = rampup_ratio
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def beta(self, cur_nimg: int, batch_size: int) -> float:
        halflife_nimg = self.halflife_kimg * 1000.0
        if self.rampup_ratio is not None:
            halflife_nimg = min(halflife_nimg, cur_nimg * self.rampup_ratio)
        return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))

    @torch.no_grad()
    def update(self, model: nn.Module, cur_nimg: int, batch_size: int) -> float:
        """Blend ``model`` into the average; ``cur_nimg`` counts images seen *including* this step."""
        beta = self.beta(cur_nimg, batch_size)
        for p_ema, p in zip(self.model.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1.0 - beta)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
        return beta

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
