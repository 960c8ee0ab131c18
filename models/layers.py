"""Shared building blocks for the UNet-style denoiser networks (SongUNet now, DhariwalUNet/ADM later).

Everything here follows the layer conventions of Karras et al. 2022 (EDM, "Elucidating the Design Space of
Diffusion-Based Generative Models", arXiv 2206.00364, Appendix F, and the settings of its released networks),
re-derived from the math:

* Weight init (``weight_init``), with ``fan_in``/``fan_out`` = channels x kernel area:
    xavier_uniform  w ~ U(-a, a),   a = sqrt(6 / (fan_in + fan_out))
    xavier_normal   w ~ N(0, s^2),  s = sqrt(2 / (fan_in + fan_out))
    kaiming_uniform w ~ U(-a, a),   a = sqrt(3 / fan_in)
    kaiming_normal  w ~ N(0, s^2),  s = sqrt(1 / fan_in)
  then multiplied by ``init_weight`` (weights) or ``init_bias`` (biases; drawn with the same law, so
  ``init_bias=0`` gives zero biases).
* ``Conv2d`` with optional 2x up/down-sampling through a separable FIR filter ``f`` (e.g. [1,1] box or [1,3,3,1]
  binomial): the 2-D kernel is the outer product f f^T / (sum f)^2 (unit DC gain); downsampling = depthwise
  stride-2 convolution with it, upsampling = depthwise stride-2 transposed convolution with 4x it (the 4
  compensates the zeros inserted between samples). "Fused" resampling applies the 3x3 convolution at the low
  resolution side (conv then downsample / upsample then conv with merged padding), as SongUNet does.
* ``GroupNorm`` with EDM's group-count rule ``num_groups = min(32, C // min_channels_per_group)``.
* ``PositionalEmbedding``: transformer sinusoids, freqs_i = (1/max_positions)^(i / (C/2 - endpoint)),
  output [cos(x f), sin(x f)]. ``FourierEmbedding``: random Fourier features, freqs ~ N(0, scale^2) (a fixed,
  non-trainable buffer), output [cos(2 pi x f), sin(2 pi x f)] (Tancik et al. 2020; Song et al. 2021).
* ``UNetBlock``: pre-activation residual block GroupNorm -> SiLU -> conv3x3 (optionally resampling) ->
  embedding injection (additive: h + A e, or adaptive scale/shift: h * (1 + s) + b with [s, b] = A e) -> SiLU ->
  dropout -> conv3x3 (tiny init); skip path identity or a conv (1x1, or a pure FIR resample when only resampling
  and ``resample_proj`` is off); out = (h + skip) * skip_scale; optional multi-head self-attention
  (GroupNorm -> 1x1 qkv conv -> softmax(q^T k / sqrt(d)) v -> 1x1 proj, residual, again * skip_scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Draw a tensor of ``shape`` with one of the ``INIT_MODES`` laws (see the module docstring)."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init_mode '{mode}'; valid: {', '.join(INIT_MODES)}")


class Linear(nn.Module):
    """Fully connected layer y = x W^T + b with EDM-style initialisation (``weight_init``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def fir_kernel_2d(taps: Sequence[float]) -> torch.Tensor:
    """Separable 2-D FIR kernel f f^T / (sum f)^2 of shape [1, 1, K, K] (unit DC gain)."""
    taps = [float(t) for t in taps]
    if not taps or sum(taps) == 0.0:
        raise ValueError(f"resample_filter must be a non-empty list of numbers with non-zero sum, got {taps}")
    f = torch.tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / sum(taps) ** 2).reshape(1, 1, len(taps), len(taps))


class Conv2d(nn.Module):
    """2-D convolution ("same" padding, odd kernel) with optional 2x FIR up/down-sampling.

    ``kernel=0`` gives a parameter-free layer that only resamples (in_channels must equal out_channels).
    With ``fused_resample`` the convolution runs on the low-resolution side of the resampling.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down cannot both be set")
        if kernel < 0 or (kernel > 0 and kernel % 2 == 0):
            raise ValueError(f"Conv2d: kernel must be 0 (resample only) or odd, got {kernel}")
        if kernel == 0 and in_channels != out_channels:
            raise ValueError(f"Conv2d: kernel=0 needs in_channels == out_channels, got {in_channels}, {out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel = kernel
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (
            nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
            if kernel
            else None
        )
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        self.register_buffer("resample_filter", fir_kernel_2d(resample_filter) if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = self.kernel // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        cin, cout = self.in_channels, self.out_channels
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, (f * 4).tile(cin, 1, 1, 1), groups=cin, stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(cout, 1, 1, 1), groups=cout, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile(cin, 1, 1, 1), groups=cin, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile(cin, 1, 1, 1), groups=cin, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel={self.kernel}"
        if self.up or self.down:
            s += f", {'up' if self.up else 'down'}, fused={self.fused_resample}"
        return s


class GroupNorm(nn.Module):
    """Group normalisation with EDM's group-count rule ``min(num_groups, C // min_channels_per_group)``."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        if num_channels % groups != 0:
            raise ValueError(
                f"GroupNorm: {num_channels} channels cannot be split into {groups} groups "
                f"(groups = min({num_groups}, C // {min_channels_per_group})); choose a channel count divisible by it"
            )
        self.num_channels = num_channels
        self.num_groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.num_groups}, eps={self.eps}"


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos(x f_i), sin(x f_i)], f_i = (1/max_positions)^(i / (C/2 - endpoint)), i < C/2."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        if num_channels < 2 or num_channels % 2 or (endpoint and num_channels < 4):
            raise ValueError(f"PositionalEmbedding: num_channels must be even and >= {4 if endpoint else 2}")
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x.to(torch.float32), freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi x f), sin(2 pi x f)], f ~ N(0, scale^2) fixed (non-trainable buffer)."""

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"FourierEmbedding: num_channels must be even and >= 2, got {num_channels}")
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x.to(torch.float32), (2 * math.pi) * self.freqs.to(torch.float32))
        return torch.cat([x.cos(), x.sin()], dim=1)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions: out = proj(softmax(q^T k / sqrt(d)) v).

    The qkv 1x1 conv output channels are laid out as [head, channel-in-head, (q, k, v)].
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        eps: float = 1e-5,
        init: dict | None = None,
        init_zero: dict | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"SelfAttention: {channels} channels not divisible into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = GroupNorm(channels, eps=eps)
        self.qkv = Conv2d(channels, channels * 3, kernel=1, **(init or {}))
        self.proj = Conv2d(channels, channels, kernel=1, **(init_zero or {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n * self.num_heads, c // self.num_heads, 3, h * w)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [N*heads, HW, d]
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(n, c, h, w))


class UNetBlock(nn.Module):
    """Pre-activation residual block with timestep/class embedding and optional self-attention (see module doc).

    ``num_heads`` (if given) fixes the head count; otherwise heads = out_channels // channels_per_head.
    ``init`` / ``init_zero`` / ``init_attn`` are kwargs dicts for Conv2d/Linear init (init_zero: last conv of
    each branch; init_attn: the qkv conv, defaults to ``init``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        resample_filter: Sequence[float] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: dict | None = None,
        init_zero: dict | None = None,
        init_attn: dict | None = None,
    ) -> None:
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0.0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        if attention:
            heads = num_heads if num_heads is not None else out_channels // channels_per_head
            if heads < 1:
                raise ValueError(f"UNetBlock: attention needs >= 1 head, got {heads} for {out_channels} channels")
        self.num_heads = heads if attention else 0

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(
            in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init
        )
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(
                in_channels, out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init
            )
        self.attn = (
            SelfAttention(out_channels, self.num_heads, eps=eps, init=init_attn or init, init_zero=init_zero)
            if self.num_heads
            else None
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).to(x.dtype)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.attn is not None:
            x = (self.attn(x) + x) * self.skip_scale
        return x


# ---------------------------------------------------------------------------------------------------------------------
# Conditioning inputs shared by every network: the noise label and the (one-hot) class label.


def check_unet_args(
    img_resolution: int, channel_mult: Sequence[int], dropout: float, label_dropout: float
) -> list[int]:
    """Validate the hyperparameters every UNet here shares; returns ``channel_mult`` as a list of ints.

    Each level below the first halves the resolution, so ``img_resolution`` must be a multiple of
    2**(len(channel_mult) - 1); ``dropout`` is a probability in [0, 1) and ``label_dropout`` one in [0, 1].
    """
    channel_mult = [int(m) for m in channel_mult]
    if len(channel_mult) < 1:
        raise ValueError("channel_mult must have at least one entry")
    factor = 2 ** (len(channel_mult) - 1)
    if img_resolution < factor or img_resolution % factor:
        raise ValueError(
            f"img_resolution={img_resolution} must be a multiple of 2**(len(channel_mult)-1) = {factor} "
            f"(channel_mult={channel_mult} has {len(channel_mult)} levels, each lower level halves the resolution)"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    check_label_dropout(label_dropout)
    return channel_mult


def check_label_dropout(label_dropout: float) -> None:
    """Classifier-free-guidance label dropout is a probability in [0, 1]."""
    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")


def noise_label_batch(noise_labels: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """``noise_labels`` as float32 [batch_size] on ``device`` (a single value is broadcast)."""
    noise_labels = torch.as_tensor(noise_labels, dtype=torch.float32, device=device)
    if noise_labels.numel() == 1:
        noise_labels = noise_labels.reshape(1).expand(batch_size)
    if noise_labels.shape != (batch_size,):
        raise ValueError(f"noise_labels must have shape [{batch_size}], got {list(noise_labels.shape)}")
    return noise_labels


def class_label_batch(class_labels: torch.Tensor | None, batch_size: int, label_dim: int, like: torch.Tensor,
                      training: bool = False, dropout: float = 0.0) -> torch.Tensor:
    """One-hot class labels [batch_size, label_dim] in ``like``'s dtype; None (and a dropped label) is the all-zero
    row, the null class of classifier-free guidance. ``dropout`` drops labels with that probability in training."""
    if class_labels is None:
        return like.new_zeros(batch_size, label_dim)
    if class_labels.shape != (batch_size, label_dim):
        raise ValueError(f"class_labels must be one-hot of shape [{batch_size}, {label_dim}], "
                         f"got {list(class_labels.shape)}")
    labels = class_labels.to(like.dtype)
    if training and dropout:
        keep = torch.rand(batch_size, 1, device=labels.device) >= dropout
        labels = labels * keep.to(labels.dtype)
    return labels
