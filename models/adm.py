"""ADM: the class-conditional UNet of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on Image Synthesis") in the
form EDM uses for ImageNet-64 (Karras et al. 2022, arXiv 2206.00364, ``--arch=adm``, "DhariwalUNet"; Dhariwal &
Nichol 2021, arXiv 2105.05233), written from the architecture description; with EDM's ImageNet-64 settings
(model_channels 192, channel_mult [1,2,3,4], 1000 classes, no augmentation labels) it has exactly the 295,899,267
parameters of EDM's released ADM network (tests/test_adm.py).

Layout (R = img_resolution, levels l = 0..L-1 at resolution R / 2^l, C_l = model_channels * channel_mult[l],
E = model_channels * channel_mult_emb):

* Embedding: e = [cos(c f_i), sin(c f_i)] of the noise label c (``PositionalEmbedding``, model_channels channels,
  f_i = 10000^(-i / (model_channels / 2)), no endpoint, no [cos, sin] swap) + Linear(augment_dim -> model_channels,
  no bias)(augment_labels); then h = Linear(SiLU(Linear(e))) (E channels); class labels enter *after* the MLP:
  emb = SiLU(h + W y) with W a bias-free Linear(label_dim -> E) whose entries start ~ N(0, 1) (kaiming-normal x
  sqrt(label_dim)), i.e. a learned class-embedding table, and y the one-hot label (all-zero = no label: the null
  input for classifier-free guidance; ``class_labels=None`` means all-zero).
* Encoder: a 3x3 conv to C_0 at level 0, a downsampling residual block at each lower level, then ``num_blocks``
  residual blocks to C_l per level, each followed by self-attention at ``attn_resolutions``; every output is a skip.
* Decoder (bottom-up): the bottom level starts with two blocks (the first with attention), other levels with an
  upsampling block; then num_blocks + 1 blocks per level, each consuming one skip (channel concat), all with
  attention at ``attn_resolutions``. Output GroupNorm -> SiLU -> 3x3 conv (zero-initialised: a fresh ADM outputs 0).
* Blocks (``models.layers.UNetBlock``): adaptive scale/shift embedding injection h * (1 + s) + b, skip_scale 1,
  GroupNorm eps 1e-5, parameter-free [1,1] box-filter resampling on the skip path (1x1 conv only when the width
  changes), heads = channels // ``channels_per_head`` (64), dropout before the second conv.
* Init: kaiming_uniform with weight and bias gain sqrt(1/3) (PyTorch's default U(+-1/sqrt(fan_in))), the last conv
  of every residual branch, of every attention and of the output zero-initialised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import (
    Conv2d,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    check_unet_args,
    class_label_batch,
    noise_label_batch,
)


def _check_attention_width(img_resolution: int, channel_mult: Sequence[int], num_blocks: int,
                           attn_resolutions: Sequence[int], model_channels: int, channels_per_head: int) -> None:
    """Raise ValueError for a block count < 1 or an attention level narrower than one head."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if res in attn_resolutions and model_channels * mult < channels_per_head:
            raise ValueError(
                f"attention at {res}x{res} needs at least channels_per_head={channels_per_head} channels, level "
                f"{level} has model_channels * channel_mult[{level}] = {model_channels * mult}; lower "
                "channels_per_head or drop the resolution from attn_resolutions"
            )


class DhariwalUNet(nn.Module):
    """EDM's ADM / DhariwalUNet (see the module docstring). Interface as every models/ network."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        channels_per_head: int = 64,
        dropout: float = 0.10,
        label_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channel_mult = check_unet_args(img_resolution, channel_mult, dropout, label_dropout)
        attn_resolutions = [int(r) for r in attn_resolutions]
        _check_attention_width(img_resolution, channel_mult, num_blocks, attn_resolutions, model_channels,
                               channels_per_head)

        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout

        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0.0, init_bias=0.0)
        block_kwargs = dict(
            emb_channels=emb_channels,
            channels_per_head=channels_per_head,
            dropout=dropout,
            skip_scale=1.0,
            eps=1e-5,
            resample_filter=(1, 1),
            resample_proj=False,
            adaptive_scale=True,
            init=init,
            init_zero=init_zero,
        )
        # Registration order (embedding, encoder, decoder, output) fixes the parameter order and the init's RNG draws.
        self._build_embedding(model_channels, emb_channels, init)
        cout = self._build_encoder(model_channels, channel_mult, num_blocks, attn_resolutions, init, block_kwargs)
        cout = self._build_decoder(cout, model_channels, channel_mult, num_blocks, attn_resolutions, block_kwargs)
        self.out_norm = GroupNorm(cout, eps=1e-5)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def _build_embedding(self, model_channels: int, emb_channels: int, init: dict) -> None:
        """Noise-level embedding (+ augmentation labels), the two-layer MLP, and the class-embedding table."""
        self.map_noise = PositionalEmbedding(model_channels, endpoint=False)
        self.map_augment = (
            Linear(self.augment_dim, model_channels, bias=False, init_mode="kaiming_normal")
            if self.augment_dim else None
        )
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (
            Linear(self.label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                   init_weight=math.sqrt(self.label_dim))
            if self.label_dim
            else None
        )

    def _build_encoder(self, model_channels: int, channel_mult: Sequence[int], num_blocks: int,
                       attn_resolutions: Sequence[int], init: dict, block_kwargs: dict) -> int:
        """``self.enc``; returns the channel count at the bottom."""
        self.enc = nn.ModuleDict()
        cout = self.in_channels
        for level, mult in enumerate(channel_mult):
            res = self.img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels * mult, kernel=3, **init)
                cout = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs
                )
        return cout

    def _build_decoder(self, cout: int, model_channels: int, channel_mult: Sequence[int], num_blocks: int,
                       attn_resolutions: Sequence[int], block_kwargs: dict) -> int:
        """``self.dec``; blocks named "_block{idx}" consume one encoder output each. Returns the output width."""
        skip_channels = [m.out_channels for m in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = self.img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs
                )
        assert not skip_channels
        return cout

    def embed(
        self,
        noise_labels: torch.Tensor,
        batch_size: int,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block-conditioning vector emb [N, model_channels * channel_mult_emb] (see the module docstring)."""
        noise_labels = noise_label_batch(noise_labels, batch_size, self.map_layer0.weight.device)
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = class_label_batch(class_labels, batch_size, self.label_dim, emb, self.training,
                                       self.label_dropout)
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [N, in_channels, R, R]; noise_labels: [N] (c_noise, used as is); class_labels: [N, label_dim] one-hot
        or None; augment_labels: [N, augment_dim] or None. Returns [N, out_channels, R, R].

        Labels are ignored when the network was built with label_dim=0 / augment_dim=0.
        """
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape [N, {', '.join(map(str, expected))}], got {list(x.shape)}")
        emb = self.embed(noise_labels, x.shape[0], class_labels, augment_labels)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
