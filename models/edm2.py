"""EDM2: the magnitude-preserving UNet of Karras, Aittala, Lehtinen, Hellsten, Aila & Laine 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models" (arXiv 2312.02696), written from the paper's description
(Sec. 2, configurations C-G; the architecture diagram is Fig. 21). With EDM2's settings its
parameter counts equal the published networks' to the unit (tests/test_edm2.py).

Sizes live in ``EDM2_SIZES`` below (the one table: ``model_channels`` and ``dropout`` per size name, XXS..XXL); a
``configs/model/edm2_<size>.yaml`` preset names its size and leaves ``model_channels`` / ``dropout`` null, and an
explicit value overrides the size's (reduced test networks, ``edm2_tiny``, ``model.dropout=...``).

Magnitude-preserving ("MP") primitives -- each keeps unit expected magnitude (RMS) of unit-magnitude inputs:

* ``normalize(x, dim)``: x / (eps + RMS of x over ``dim``), eps = 1e-4. Over the channel axis this is the *pixel
  norm* (the only normalisation left; no GroupNorm, no learned norm parameters).
* ``MPConv`` (convolution, or fully connected with ``kernel=0``; no bias): weight w of shape [out, in, k, k] drawn
  N(0, 1). Used weight = gain * w_i / ||w_i|| per output channel i, so a unit-magnitude input gives an output of
  magnitude |gain|. *Forced weight normalisation* (Sec. 2, config E): in every training-mode forward the stored
  weight is first overwritten, without gradient, by normalize(w), i.e. every row w_i gets RMS 1 (norm sqrt(fan_in),
  fan_in = in * k * k); the used weight is then computed from it through the differentiable normalisation, so the
  gradient is orthogonal to each row and the stored weights cannot grow.
* ``mp_silu(x) = silu(x) / 0.596`` (0.596 = sqrt(E[silu(z)^2]), z ~ N(0, 1)).
* ``mp_sum(a, b, t) = ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)`` (lerp, renormalised for independent a, b).
* ``mp_cat(a, b, t)``: concatenation along channels with a scaled by C (1 - t) / sqrt(Na) and b by C t / sqrt(Nb),
  C = sqrt((Na + Nb) / ((1 - t)^2 + t^2)), so the result has unit magnitude and b's share of it is set by t.
* ``MPFourier``: cos(2 pi (f x + phi)) * sqrt(2), f ~ N(0, 1), phi ~ U(0, 1) fixed buffers (not trained).

Network (R = img_resolution, C_l = model_channels * channel_mult[l]; EDM2: channel_mult [1, 2, 3, 4], 3 blocks
per level, attention at 16 and 8 with 64 channels per head):

* Embedding: emb = MPConv(MPFourier(c_noise)) (cnoise = C_0 -> cemb = max(C_l) = 4 * model_channels); with labels
  emb = mp_sum(emb, MPConv(sqrt(label_dim) * one_hot), t=label_balance 0.5); then emb = mp_silu(emb).
  ``class_labels=None`` (or a label dropped by ``label_dropout``, 0 in EDM2) is the all-zero row.
* Input: x with an extra constant-1 channel (in the place of the removed biases). Encoder: 3x3 MPConv to C_0 at
  level 0, a downsampling block at each lower level, then ``num_blocks`` blocks to C_l; every output is a skip.
  Decoder (bottom-up): two blocks at the bottom (the first with attention), an upsampling block at the other levels,
  then num_blocks + 1 blocks that each take mp_cat(x, skip, t=concat_balance 0.5). Output: 3x3 MPConv with the
  learned scalar gain ``out_gain``, initialised 0, so a fresh network outputs exactly 0.
* Block: resample ([1, 1] box filter: 2x2 average pool down, nearest-neighbour up) -> encoder only: 1x1 MPConv skip
  when the width changes, then pixel norm. Residual branch: y = conv3x3(mp_silu(x)); y = mp_silu(y * (1 + c)) with
  c = MPConv(emb, gain=emb_gain) (scalar ``emb_gain`` initialised 0); dropout; conv3x3. Decoder only: 1x1 MPConv
  skip when the width changes. x = mp_sum(x, y, t=res_balance 0.3). Attention (at ``attn_resolutions``, heads =
  C // channels_per_head): cosine attention -- 1x1 MPConv to q, k, v (channel layout [head, channel, q/k/v]), each
  pixel-normed over the head's channels, softmax(q^T k / sqrt(d)) v, 1x1 MPConv, x = mp_sum(x, y, t=attn_balance
  0.3). Finally x is clamped to [-clip_act, clip_act] (256).

The clamp: EDM2 clamps every block output at +-256 to keep float16 training from overflowing (float16's largest
value is 65504). EDM2's published code clamps unconditionally, in every dtype, and so does this module: the network
is then one function whatever precision runs it, and with activations of magnitude ~1 a clamp at 256 is inactive
in normal operation. ``clip_act=None`` disables it.

EDM2 keeps EDM's preconditioning (c_noise = ln(sigma) / 4), applied outside the network. The learned uncertainty
u(sigma) of EDM2's loss (Sec. 2, config B) is ``EDM2LogVar``, a separate module (not part of the UNet).
EDM2 has no augmentation-label input; ``augment_dim > 0`` is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import check_unet_args, class_label_batch, noise_label_batch

# EDM2's network sizes XXS..XXL (Karras et al. 2024, arXiv 2312.02696): size -> (model_channels, dropout).
EDM2_SIZES: dict[str, tuple[int, float]] = {
    "xxs": (64, 0.0),
    "xs": (128, 0.0),
    "s": (192, 0.0),
    "m": (256, 0.10),
    "l": (320, 0.10),
    "xl": (384, 0.10),
    "xxl": (448, 0.10),
}

MP_SILU_SCALE = 0.596  # sqrt(E[silu(z)^2]) for z ~ N(0, 1), as EDM2 rounds it


# ---------------------------------------------------------------------------------------------------------------------
# Magnitude-preserving primitives.


def normalize(x: torch.Tensor, dim: int | Sequence[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + RMS(x over ``dim``)); ``dim=None`` means every axis but the first (one RMS per leading index)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    count = math.prod(x.shape[d] for d in dims)
    rms = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32) / math.sqrt(count)
    return x / (rms + eps).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled to unit magnitude for unit-normal input (Sec. 2, config G)."""
    return F.silu(x) / MP_SILU_SCALE


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2): a weighted sum of unit magnitude for independent a, b."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation of unit magnitude in which ``b`` contributes the fraction set by ``t`` (see module doc)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c * (1 - t) / math.sqrt(na)), b * (c * t / math.sqrt(nb))], dim=dim)


class MPFourier(nn.Module):
    """Fourier features cos(2 pi (f x + phi)) * sqrt(2) with fixed f ~ N(0, bandwidth^2), phi ~ U(0, 1) (buffers)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"MPFourier: num_channels must be >= 1, got {num_channels}")
        self.register_buffer("freqs", torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phase = torch.outer(x.to(torch.float32).flatten(), self.freqs.to(torch.float32)) + self.phases.float()
        return (torch.cos(2 * math.pi * phase) * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Bias-free convolution (``kernel`` odd) or fully connected layer (``kernel=0``) with forced weight normalisation.

    forward(x, gain): the effective weight is gain * w_i / ||w_i|| per output channel (module docstring); in training
    mode the stored weight is first re-normalised in place to RMS 1 per output channel (norm sqrt(fan_in)).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 0) -> None:
        super().__init__()
        if kernel < 0 or (kernel > 0 and kernel % 2 == 0):
            raise ValueError(f"MPConv: kernel must be 0 (fully connected) or odd, got {kernel}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel = kernel
        shape = [out_channels, in_channels] + ([kernel, kernel] if kernel else [])
        self.weight = nn.Parameter(torch.randn(shape))

    @property
    def fan_in(self) -> int:
        return self.in_channels * max(self.kernel, 1) ** 2

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.to(torch.float32)))  # forced weight normalisation
        # clone(): the graph keeps its own copy, so a later training forward's in-place re-normalisation cannot
        # invalidate it (two forwards before one backward work).
        w = normalize(self.weight.to(torch.float32).clone()) * (gain / math.sqrt(self.fan_in))
        w = w.to(x.dtype)
        if not self.kernel:
            return x @ w.t()
        return F.conv2d(x, w, padding=self.kernel // 2)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={self.kernel or 'fc'}"


# ---------------------------------------------------------------------------------------------------------------------
# Network.


class EDM2Block(nn.Module):
    """One EDM2 residual block, ``flavor`` "enc" or "dec", ``resample`` "keep", "down" or "up" (module docstring)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample: str = "keep",
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256.0,
    ) -> None:
        super().__init__()
        if flavor not in ("enc", "dec") or resample not in ("keep", "down", "up"):
            raise ValueError(f"EDM2Block: bad flavor '{flavor}' or resample '{resample}'")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample = resample
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.num_heads = out_channels // channels_per_head if attention else 0
        if attention and (self.num_heads < 1 or out_channels % self.num_heads):
            raise ValueError(
                f"attention with channels_per_head={channels_per_head} needs a width of at least that and divisible "
                f"into heads = width // channels_per_head; got {out_channels} channels"
            )
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=3)
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=0)
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=3)
        self.conv_skip = MPConv(in_channels, out_channels, kernel=1) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=1) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=1) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            n, ch, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(n, self.num_heads, ch // self.num_heads, 3, h * w)
            q, k, v = (t.transpose(2, 3) for t in normalize(qkv, dim=2).unbind(3))  # [N, heads, HW, d]
            y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
            y = self.attn_proj(y.transpose(2, 3).reshape(n, ch, h, w))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


def _resolve_size(size: str | None, model_channels: int | None, dropout: float | None) -> tuple[int, float]:
    """(model_channels, dropout) from ``EDM2_SIZES[size]``, each overridden when given explicitly."""
    if size is not None:
        if size not in EDM2_SIZES:
            raise ValueError(f"unknown EDM2 size '{size}'; valid: {', '.join(EDM2_SIZES)}")
        channels, drop = EDM2_SIZES[size]
        model_channels = channels if model_channels is None else model_channels
        dropout = drop if dropout is None else dropout
    if model_channels is None:
        raise ValueError(f"EDM2UNet needs a size ({', '.join(EDM2_SIZES)}) or an explicit model_channels")
    if model_channels < 1:
        raise ValueError(f"model_channels must be >= 1, got {model_channels}")
    return int(model_channels), float(0.0 if dropout is None else dropout)


class EDM2UNet(nn.Module):
    """EDM2's magnitude-preserving UNet (module docstring). Interface as every models/ network."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        size: str | None = None,
        model_channels: int | None = None,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        channels_per_head: int = 64,
        dropout: float | None = None,
        label_dropout: float = 0.0,
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256.0,
    ) -> None:
        super().__init__()
        model_channels, dropout = _resolve_size(size, model_channels, dropout)
        channel_mult = check_unet_args(img_resolution, channel_mult, dropout, label_dropout)
        attn_resolutions = [int(r) for r in attn_resolutions]
        if augment_dim:
            raise ValueError(
                f"EDM2UNet has no augmentation-label input (EDM2 trains without augmentation); got augment_dim="
                f"{augment_dim}: switch data augmentation off for this model"
            )
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        for name, t in (("label_balance", label_balance), ("concat_balance", concat_balance),
                        ("res_balance", res_balance), ("attn_balance", attn_balance)):
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {t}")

        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        self.label_balance = label_balance
        self.concat_balance = concat_balance

        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        block_kwargs = dict(emb_channels=cemb, channels_per_head=channels_per_head, dropout=dropout,
                            res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act)

        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=0)
        self.emb_label = MPConv(label_dim, cemb, kernel=0) if label_dim else None

        cout = self._build_encoder(in_channels + 1, cblock, num_blocks, attn_resolutions, block_kwargs)  # + const. 1
        cout = self._build_decoder(cout, cblock, num_blocks, attn_resolutions, block_kwargs)
        self.out_conv = MPConv(cout, out_channels, kernel=3)

    def _build_encoder(self, cout: int, cblock: list[int], num_blocks: int, attn_resolutions: list[int],
                       block_kwargs: dict) -> int:
        """``self.enc``: per level an input conv (level 0) or a downsampling block, then ``num_blocks`` blocks;
        returns the channels of its output."""
        res0 = self.img_resolution
        self.enc = nn.ModuleDict()
        for level, channels in enumerate(cblock):
            res = res0 >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, channels, kernel=3)
                cout = channels
            else:
                self.enc[f"{res}x{res}_down"] = EDM2Block(cout, cout, flavor="enc", resample="down", **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = EDM2Block(
                    cin, cout, flavor="enc", attention=res in attn_resolutions, **block_kwargs
                )
        return cout

    def _build_decoder(self, cout: int, cblock: list[int], num_blocks: int, attn_resolutions: list[int],
                       block_kwargs: dict) -> int:
        """``self.dec``: blocks named "..._block{idx}" consume one encoder skip each; returns its output channels."""
        skips = [block.out_channels for block in self.enc.values()]
        res0 = self.img_resolution
        self.dec = nn.ModuleDict()
        for level, channels in reversed(list(enumerate(cblock))):
            res = res0 >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = EDM2Block(cout, cout, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = EDM2Block(cout, cout, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = EDM2Block(cout, cout, flavor="dec", resample="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = EDM2Block(
                    cin, cout, flavor="dec", attention=res in attn_resolutions, **block_kwargs
                )
        assert not skips
        return cout

    def embed(self, noise_labels: torch.Tensor, batch_size: int, class_labels: torch.Tensor | None,
              like: torch.Tensor) -> torch.Tensor:
        """The block-conditioning vector emb [N, cemb] in ``like``'s dtype (module docstring)."""
        noise_labels = noise_label_batch(noise_labels, batch_size, like.device)
        emb = self.emb_noise(self.emb_fourier(noise_labels).to(like.dtype))
        if self.emb_label is not None:
            labels = class_label_batch(class_labels, batch_size, self.label_dim, like, self.training,
                                       self.label_dropout)
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(self.label_dim)), t=self.label_balance)
        return mp_silu(emb)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [N, in_channels, R, R]; noise_labels: [N] (c_noise); class_labels: [N, label_dim] one-hot or None;
        augment_labels: must be None (no augmentation input). Returns [N, out_channels, R, R].

        As every models/ network, class labels are ignored when the network was built with label_dim=0.
        """
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape [N, {', '.join(map(str, expected))}], got {list(x.shape)}")
        if augment_labels is not None:
            raise ValueError("EDM2UNet has no augmentation-label input; pass augment_labels=None")
        emb = self.embed(noise_labels, x.shape[0], class_labels, x)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for block in self.enc.values():
            x = block(x) if isinstance(block, MPConv) else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class EDM2LogVar(nn.Module):
    """The learned uncertainty u(sigma) of EDM2's loss (Sec. 2, config B): u = MPConv(MPFourier(c_noise)).

    ``forward(noise_labels)`` takes the preconditioning's c_noise = ln(sigma) / 4, shape [N] (or a scalar), and returns
    u, shape [N]. EDM2's loss is lambda(sigma) / exp(u) * ||D - y||^2 + u. Parameters: ``channels`` weights (128 in
    EDM2: ``EDM2UNet`` + this module = the published parameter counts); the Fourier frequencies are buffers.
    """

    def __init__(self, channels: int = 128) -> None:
        super().__init__()
        self.fourier = MPFourier(channels)
        self.linear = MPConv(channels, 1, kernel=0)

    def forward(self, noise_labels: torch.Tensor) -> torch.Tensor:
        noise_labels = torch.as_tensor(noise_labels, dtype=torch.float32, device=self.linear.weight.device)
        return self.linear(self.fourier(noise_labels.flatten())).flatten()


__all__ = [
    "EDM2_SIZES",
    "EDM2Block",
    "EDM2LogVar",
    "EDM2UNet",
    "MPConv",
    "MPFourier",
    "mp_cat",
    "mp_silu",
    "mp_sum",
    "normalize",
]
