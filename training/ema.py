"""Exponential moving average of the network weights, with EDM's half-life-in-images parameterisation.

Karras et al. (2022, arXiv 2206.00364), training_loop: after each optimizer step with a global batch of B images,

    half-life h = ema_halflife_kimg·1000, capped at ema_rampup_ratio·cur_nimg during early training (ramp-up),
    β = 0.5^(B / max(h, 1e-8)),     θ_ema ← β·θ_ema + (1 − β)·θ.

Buffers (e.g. normalisation statistics) are copied, not averaged.

The update is one fused ``torch._foreach_lerp_`` over all parameters (θ_ema + (1 − β)·(θ − θ_ema), the same formula,
element by element, as a per-parameter ``lerp_``, so the numbers are bit-identical to a Python loop of ``lerp_``) and
one ``torch._foreach_copy_`` over the buffers: two kernel launches per step on a GPU instead of one per tensor.
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
        self._pairs: tuple | None = None  # (source module, its params, ema params, its buffers, ema buffers)

    def beta(self, cur_nimg: int, batch_size: int) -> float:
        halflife_nimg = self.halflife_kimg * 1000.0
        if self.rampup_ratio is not None:
            halflife_nimg = min(halflife_nimg, cur_nimg * self.rampup_ratio)
        return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))

    def _tensor_lists(self, model: nn.Module) -> tuple:
        """The (source, EMA) parameter and buffer lists, matched by position; built once per source module (loading
        a state dict copies into the same tensors, so the lists stay valid)."""
        if self._pairs is None or self._pairs[0] is not model:
            src_params = [p.detach() for p in model.parameters()]
            ema_params = list(self.model.parameters())
            src_buffers, ema_buffers = list(model.buffers()), list(self.model.buffers())
            if len(src_params) != len(ema_params) or len(src_buffers) != len(ema_buffers):
                raise ValueError("EMA.update: the model has a different structure from the one the EMA was built from")
            self._pairs = (model, src_params, ema_params, src_buffers, ema_buffers)
        return self._pairs[1:]

    @torch.no_grad()
    def update(self, model: nn.Module, cur_nimg: int, batch_size: int) -> float:
        """Blend ``model`` into the average; ``cur_nimg`` counts images seen *including* this step."""
        beta = self.beta(cur_nimg, batch_size)
        src_params, ema_params, src_buffers, ema_buffers = self._tensor_lists(model)
        if ema_params:
            torch._foreach_lerp_(ema_params, src_params, 1.0 - beta)
        if ema_buffers:
            torch._foreach_copy_(ema_buffers, src_buffers)
        return beta

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
