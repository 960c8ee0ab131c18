"""EDM's non-leaking geometric augmentation (Karras et al. 2022, App. F; the geometric part of StyleGAN2-ADA).

Each operation is applied to each image independently with probability ``min(strength * p, 1)`` (EDM: p = 0.12 on
CIFAR-10 with ``xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1``; ``xflip=1e8`` makes the
x-flip coin always tossed, so half the images are mirrored whatever p is). The network is told what was done through
the *augmentation label*, one row per image, zero for an image left alone, so at sampling time (label 0) it
generates un-augmented images: the augmentation does not leak into the samples.

Operations, in order, with their label entries (only enabled operations, strength > 0, contribute entries; with the
EDM set the label has 9 entries: xflip, yflip, scale, rotate_frac x2, aniso x2, translate_frac x2):

  pixel blitting (exact)
  - xflip          w in {0, 1}: mirror left-right                                  label [w]
  - yflip          w in {0, 1}: mirror top-bottom                                  label [w]
  - rotate_int     k in {0..3}: torch.rot90(x, k, dims=(-2, -1))                   label [cos(k pi/2) - 1, sin(k pi/2)]
  - translate_int  integer shift (tx, ty) = round(u * (W, H)), u ~ U(-m, m)^2,     label [tx / (m W), ty / (m H)]
                   m = translate_int_max = 0.125, reflected at the borders
  general transforms (one combined resampling)
  - scale          s = 2^(w * scale_std), w ~ N(0, 1), scale_std = 0.2              label [w]
  - rotate_frac    theta ~ U(-pi, pi) * rotate_frac_max, counter-clockwise as
                   displayed (theta = pi/2 equals torch.rot90(x, 1, dims=(-2, -1)))  label [cos theta - 1, sin theta]
  - aniso          stretch by s = 2^(w * aniso_std) along the axis at angle r and by
                   1/s across it, w ~ N(0, 1), r ~ U(-pi, pi) with prob.
                   aniso_rotate_prob = 0.5 else 0                                  label [w cos 2r, w sin 2r]
  - translate_frac shift by (w_x W, w_y H) * translate_frac_std, w ~ N(0, I),
                   translate_frac_std = 0.125                                       label [w_x, w_y]

The anisotropic label uses the doubled angle: an axis is only defined modulo pi, and with [w cos r, w sin r] the
pairs (w, r) and (-w, r + pi) -- a stretch by s and a stretch by 1/s along the same axis -- would share a label, so
the network could not tell them apart. With 2r the label is a one-to-one function of the transform.

In pixel coordinates centred on the image (x right, y down) the general transforms compose to the forward map
q = T A R S p (scale first, translation last). The output is resampled as in ADA: reflect-pad the input, upsample 2x
with the orthonormal ``sym6`` wavelet low-pass (synthesis), bilinear ``grid_sample`` at G^-1 q on the 2x grid,
downsample 2x with the same filter (analysis), crop. Because the filter's even shifts are orthonormal
(sum_n h[n] h[n + 2k] = delta_k), downsample(upsample(x)) = x exactly: an image whose transform is the identity
comes out unchanged, and integer translations are exact.

All randomness comes from the global torch RNG of the images' device (``torch.rand``/``randn``/``randint``), so a
training loop that saves and restores its RNG state replays the same augmentations.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AugmentPipe", "build_augment_pipe", "EDM_STRENGTHS", "SYM6", "upsample2x", "downsample2x"]

# Orthonormal Daubechies least-asymmetric wavelet with 6 vanishing moments (symlet-6) low-pass decomposition filter.
SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)  # fmt: skip
_TAPS = len(SYM6)
_DELAY = (_TAPS - 2) // 2  # 5: output sample m of the 2x grid sits at (m + 0.5) / 2 input pixels
_MARGIN = 3  # output margin (input pixels) the analysis filter needs: 2 M - 5 >= 0
# sym6 is not symmetric: its low-frequency group delay sum(n h) / sum(h) = 5.098 is not the 5.5 of a symmetric filter,
# so sample m of the 2x grid effectively sits at (m + 0.5) / 2 + _SHIFT input pixels (0.20 px). The warp places both
# 2x grids (input and output) there; for identities and integer translations the shift cancels either way, for
# rotations and flips it must be accounted for.
_SHIFT = ((_DELAY + 0.5) - sum(i * v for i, v in enumerate(SYM6)) / sum(SYM6)) / 2

# EDM train.py: AugmentPipe(p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1).
EDM_STRENGTHS = {"xflip": 1e8, "yflip": 1.0, "scale": 1.0, "rotate_frac": 1.0, "aniso": 1.0, "translate_frac": 1.0}

_LABEL_DIMS = {"xflip": 1, "yflip": 1, "rotate_int": 2, "translate_int": 2, "scale": 1, "rotate_frac": 2,
               "aniso": 2, "translate_frac": 2}
_GEOMETRIC = ("scale", "rotate_frac", "aniso", "translate_frac")


# ---------------------------------------------------------------------------------------------------------------------
# 2x resampling with the orthonormal filter (separable; applied to [N, C, H, W] as N*C single-channel images)
# ---------------------------------------------------------------------------------------------------------------------
def _filter(device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.tensor(SYM6, device=device, dtype=dtype)


def upsample2x(x: Tensor) -> Tensor:
    """[N, C, H, W] -> [N, C, 2H, 2W]: U[m] = sqrt(2) sum_i x[i] h[m + 5 - 2i] along each axis (synthesis)."""
    n, c, height, width = x.shape
    h = _filter(x.device, x.dtype) * math.sqrt(2)
    y = x.reshape(n * c, 1, height, width)
    y = F.conv_transpose2d(y, h.view(1, 1, 1, _TAPS), stride=(1, 2))[:, :, :, _DELAY : _DELAY + 2 * width]
    y = F.conv_transpose2d(y, h.view(1, 1, _TAPS, 1), stride=(2, 1))[:, :, _DELAY : _DELAY + 2 * height, :]
    return y.reshape(n, c, 2 * height, 2 * width)


def downsample2x(x: Tensor) -> Tensor:
    """[N, C, 2H, 2W] -> [N, C, H, W]: D[i] = sum_m x[m] h[m + 5 - 2i] / sqrt(2) along each axis (analysis)."""
    n, c, height, width = x.shape
    h = _filter(x.device, x.dtype) / math.sqrt(2)
    right = _TAPS - 1 - _DELAY
    y = F.pad(x.reshape(n * c, 1, height, width), (_DELAY, right, _DELAY, right))
    y = F.conv2d(y, h.view(1, 1, 1, _TAPS), stride=(1, 2))
    y = F.conv2d(y, h.view(1, 1, _TAPS, 1), stride=(2, 1))
    return y.reshape(n, c, height // 2, width // 2)


def _warp(images: Tensor, g_inv: Tensor) -> Tensor:
    """Resample each image at G^-1 q (G^-1: [N, 3, 3], centred pixel coordinates, output -> input)."""
    n, c, height, width = images.shape
    m = _MARGIN
    # Input region the output (plus its filter margin) reads, from the four transformed corners.
    cx, cy = width / 2 + m, height / 2 + m
    corners = torch.tensor([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1.0, 1.0, 1.0, 1.0]], device=images.device,
                           dtype=g_inv.dtype)
    mapped = g_inv @ corners  # [N, 3, 4]
    lo = mapped[:, :2].amin(dim=(0, 2)).tolist()
    hi = mapped[:, :2].amax(dim=(0, 2)).tolist()
    # The 2x grid is exact where the synthesis filter sees only padded data: 3.25 input px from the padded edge;
    # bilinear reads 0.25 px more. Reflection padding cannot exceed size - 1 (beyond that, zeros).
    reach = 3.5
    pad_l = min(max(0, math.ceil(reach - width / 2 - lo[0])), width - 1)
    pad_r = min(max(0, math.ceil(hi[0] - width / 2 + reach)), width - 1)
    pad_t = min(max(0, math.ceil(reach - height / 2 - lo[1])), height - 1)
    pad_b = min(max(0, math.ceil(hi[1] - height / 2 + reach)), height - 1)
    padded = F.pad(images, (pad_l, pad_r, pad_t, pad_b), mode="reflect")
    up = upsample2x(padded)
    pw, ph = width + pad_l + pad_r, height + pad_t + pad_b

    # Output 2x grid with margin m: pixel q at centred coordinate (q + 0.5) / 2 + shift - m - size / 2.
    ox = (torch.arange(2 * (width + 2 * m), device=images.device, dtype=g_inv.dtype) + 0.5) / 2 + _SHIFT - cx
    oy = (torch.arange(2 * (height + 2 * m), device=images.device, dtype=g_inv.dtype) + 0.5) / 2 + _SHIFT - cy
    gx = g_inv[:, 0, 0, None, None] * ox + g_inv[:, 0, 1, None, None] * oy[:, None] + g_inv[:, 0, 2, None, None]
    gy = g_inv[:, 1, 0, None, None] * ox + g_inv[:, 1, 1, None, None] * oy[:, None] + g_inv[:, 1, 2, None, None]
    # Centred input coordinate -> padded coordinate -> grid_sample's normalised [-1, 1] (align_corners=False), where
    # up-sampled pixel m (at padded coordinate (m + 0.5) / 2 + shift) sits at (m + 0.5) / pw - 1.
    grid = torch.stack([(gx + width / 2 + pad_l - _SHIFT) * (2 / pw) - 1,
                        (gy + height / 2 + pad_t - _SHIFT) * (2 / ph) - 1], dim=-1)
    out = F.grid_sample(up, grid.to(up.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    return downsample2x(out)[:, :, m : m + height, m : m + width]


def _matrix(n: int, device: torch.device, rows: list[list[Any]]) -> Tensor:
    """[N, 3, 3] from a 3x3 nested list of scalars or [N] tensors."""
    out = torch.zeros(n, 3, 3, device=device)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            out[:, i, j] = v
    return out


def _rotate_inv(theta: Tensor) -> Tensor:
    """Inverse of the display-counter-clockwise rotation q = [[c, s], [-s, c]] p (y pointing down)."""
    c, s = theta.cos(), theta.sin()
    return _matrix(theta.shape[0], theta.device, [[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _scale_inv(sx: Tensor, sy: Tensor) -> Tensor:
    return _matrix(sx.shape[0], sx.device, [[1 / sx, 0, 0], [0, 1 / sy, 0], [0, 0, 1]])


def _translate_inv(tx: Tensor, ty: Tensor) -> Tensor:
    return _matrix(tx.shape[0], tx.device, [[1, 0, -tx], [0, 1, -ty], [0, 0, 1]])


def _axis_rotation(phi: Tensor) -> Tensor:
    """The coordinate rotation [[cos, -sin], [sin, cos]] (maps the x axis onto the direction (cos phi, sin phi))."""
    c, s = phi.cos(), phi.sin()
    return _matrix(phi.shape[0], phi.device, [[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _reflect(index: Tensor, size: int) -> Tensor:
    """Mirror indices into [0, size) without repeating the edge (as ``F.pad(mode="reflect")``)."""
    period = 2 * (size - 1)
    if period == 0:
        return torch.zeros_like(index)
    index = index.remainder(period)
    return torch.where(index >= size, period - index, index)


class AugmentPipe:
    """EDM's geometric augmentation: ``images, labels = pipe(images)`` (see the module docstring).

    Args:
        p: overall probability multiplier in [0, 1]; 0 disables everything.
        xflip, yflip, scale, rotate_frac, aniso, translate_frac: strengths (probability = min(strength * p, 1)); the
            defaults are EDM's CIFAR-10 settings.
        rotate_int, translate_int: ADA's exact 90-degree rotations and integer translations (off in EDM).
        translate_int_max, scale_std, rotate_frac_max, aniso_std, aniso_rotate_prob, translate_frac_std: magnitudes
            (ADA / EDM defaults).
    """

    def __init__(
        self,
        p: float = 0.12,
        xflip: float = EDM_STRENGTHS["xflip"],
        yflip: float = EDM_STRENGTHS["yflip"],
        scale: float = EDM_STRENGTHS["scale"],
        rotate_frac: float = EDM_STRENGTHS["rotate_frac"],
        aniso: float = EDM_STRENGTHS["aniso"],
        translate_frac: float = EDM_STRENGTHS["translate_frac"],
        *,
        rotate_int: float = 0.0,
        translate_int: float = 0.0,
        translate_int_max: float = 0.125,
        scale_std: float = 0.2,
        rotate_frac_max: float = 1.0,
        aniso_std: float = 0.2,
        aniso_rotate_prob: float = 0.5,
        translate_frac_std: float = 0.125,
    ) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"augmentation probability p must be in [0, 1], got {p}")
        self.p = float(p)
        self.strengths = {"xflip": xflip, "yflip": yflip, "rotate_int": rotate_int, "translate_int": translate_int,
                          "scale": scale, "rotate_frac": rotate_frac, "aniso": aniso, "translate_frac": translate_frac}
        for op, strength in self.strengths.items():
            if strength < 0:
                raise ValueError(f"augmentation strength {op}={strength} must be non-negative")
        self.translate_int_max = float(translate_int_max)
        self.scale_std = float(scale_std)
        self.rotate_frac_max = float(rotate_frac_max)
        self.aniso_std = float(aniso_std)
        self.aniso_rotate_prob = float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)

    @property
    def enabled(self) -> list[str]:
        """Operations with a positive strength, in application order (each contributes label entries)."""
        return [op for op, s in self.strengths.items() if s > 0]

    @property
    def augment_dim(self) -> int:
        """Length of the augmentation label (9 for EDM's set); the network's ``augment_dim``."""
        return sum(_LABEL_DIMS[op] for op in self.enabled)

    def probability(self, op: str) -> float:
        return min(self.strengths[op] * self.p, 1.0)

    # --- random parameters ------------------------------------------------------------------------------------------
    def sample_params(self, n: int, height: int, width: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Per-image parameters of the enabled operations (zero where an operation is not applied)."""
        device = torch.device(device)
        params: dict[str, Tensor] = {}

        def gate(op: str, value: Tensor, shape: tuple[int, ...]) -> Tensor:
            keep = torch.rand(shape, device=device) < self.probability(op)
            return torch.where(keep, value, torch.zeros_like(value))

        for op in self.enabled:
            if op in ("xflip", "yflip"):
                params[op] = gate(op, torch.randint(2, (n,), device=device), (n,))
            elif op == "rotate_int":
                params[op] = gate(op, torch.randint(4, (n,), device=device), (n,))
            elif op == "translate_int":
                u = (torch.rand(2, n, device=device) * 2 - 1) * self.translate_int_max
                shift = torch.stack([(u[0] * width).round(), (u[1] * height).round()]).long()
                params[op] = gate(op, shift, (1, n))
            elif op == "scale":
                params[op] = gate(op, torch.randn(n, device=device), (n,))
            elif op == "rotate_frac":
                params[op] = gate(op, (torch.rand(n, device=device) * 2 - 1) * (math.pi * self.rotate_frac_max), (n,))
            elif op == "aniso":
                w = torch.randn(n, device=device)
                r = (torch.rand(n, device=device) * 2 - 1) * math.pi
                r = torch.where(torch.rand(n, device=device) < self.aniso_rotate_prob, r, torch.zeros_like(r))
                params[op] = gate(op, torch.stack([w, r]), (1, n))
            elif op == "translate_frac":
                params[op] = gate(op, torch.randn(2, n, device=device), (1, n))
        return params

    # --- deterministic application ---------------------------------------------------------------------------------
    def apply(self, images: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Apply given parameters (as from ``sample_params``): (augmented images, float32 labels [N, augment_dim])."""
        n, _, height, width = images.shape
        device = images.device
        labels: list[Tensor] = []
        for op in ("xflip", "yflip"):
            if op in self.enabled:
                w = params[op].to(device)
                images = torch.where((w == 1).view(n, 1, 1, 1), images.flip(3 if op == "xflip" else 2), images)
                labels.append(w.float()[:, None])
        if "rotate_int" in self.enabled:
            k = params["rotate_int"].to(device)
            if height != width and bool((k % 2 == 1).any()):
                raise ValueError("rotate_int by 90 degrees needs square images")
            out = images
            for quarter in (1, 2, 3):
                out = torch.where((k == quarter).view(n, 1, 1, 1), images.rot90(quarter, dims=(2, 3)), out)
            images = out
            angle = k.float() * (math.pi / 2)
            labels.append(torch.stack([angle.cos().round() - 1, angle.sin().round()], dim=1))
        if "translate_int" in self.enabled:
            shift = params["translate_int"].to(device)  # [2, N] integer pixels (x, y)
            ix = _reflect(torch.arange(width, device=device)[None, :] - shift[0][:, None], width)  # [N, W]
            iy = _reflect(torch.arange(height, device=device)[None, :] - shift[1][:, None], height)  # [N, H]
            batch = torch.arange(n, device=device)[:, None, None, None]
            channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
            images = images[batch, channel, iy[:, None, :, None], ix[:, None, None, :]]
            m = self.translate_int_max
            labels.append(torch.stack([shift[0].float() / (width * m), shift[1].float() / (height * m)], dim=1))

        g_inv = torch.eye(3, device=device).expand(n, 3, 3)
        if "scale" in self.enabled:
            w = params["scale"].to(device).float()
            s = torch.exp2(w * self.scale_std)
            g_inv = g_inv @ _scale_inv(s, s)
            labels.append(w[:, None])
        if "rotate_frac" in self.enabled:
            theta = params["rotate_frac"].to(device).float()
            g_inv = g_inv @ _rotate_inv(theta)
            labels.append(torch.stack([theta.cos() - 1, theta.sin()], dim=1))
        if "aniso" in self.enabled:
            w, r = params["aniso"].to(device).float()
            s = torch.exp2(w * self.aniso_std)
            g_inv = g_inv @ _axis_rotation(r) @ _scale_inv(s, 1 / s) @ _axis_rotation(-r)
            labels.append(torch.stack([w * (2 * r).cos(), w * (2 * r).sin()], dim=1))
        if "translate_frac" in self.enabled:
            w = params["translate_frac"].to(device).float()
            std = self.translate_frac_std
            g_inv = g_inv @ _translate_inv(w[0] * width * std, w[1] * height * std)
            labels.append(w.T)
        if any(op in self.enabled for op in _GEOMETRIC):
            images = _warp(images, g_inv.contiguous())
        label = torch.cat(labels, dim=1) if labels else torch.zeros(n, 0, device=device)
        return images, label.float()

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Augment a batch: float images [N, C, H, W] -> (images, float32 labels [N, augment_dim])."""
        if not images.is_floating_point() or images.ndim != 4:
            raise TypeError(f"AugmentPipe expects float images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        n, _, height, width = images.shape
        if self.p == 0:
            return images, torch.zeros(n, self.augment_dim, device=images.device)
        return self.apply(images, self.sample_params(n, height, width, images.device))

    def __repr__(self) -> str:
        ops = ", ".join(f"{op}={self.strengths[op]:g}" for op in self.enabled)
        return f"AugmentPipe(p={self.p:g}, {ops}, augment_dim={self.augment_dim})"


def build_augment_pipe(data_cfg: Any) -> AugmentPipe | None:
    """EDM's pipeline with ``p = data.augment`` (None when the key is absent or 0)."""
    from .dataset import cfg_to_dict

    p = cfg_to_dict(data_cfg).get("augment") or 0.0
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
        raise ValueError(f"data.augment must be a probability in [0, 1] (0 = off; EDM CIFAR-10: 0.12), got {p!r}")
    return AugmentPipe(float(p)) if p > 0 else None
