"""SongUNet: the DDPM++ / NCSN++ UNet of Song et al. 2021 ("Score-Based Generative Modeling through SDEs") in the
form used by EDM (Karras et al. 2022, arXiv 2206.00364, Appendix F; Song et al. 2021, arXiv 2011.13456), written
from the architecture description; parameter counts equal those of EDM's released DDPM++ / NCSN++ networks with its
CIFAR-10 settings exactly (e.g. 55,735,299 for the conditional DDPM++; checked in tests/test_song_unet.py).

Layout (R = img_resolution, levels l = 0..L-1 at resolution R / 2^l, C_l = model_channels * channel_mult[l]):

* Embedding: e = noise embedding of c_noise (sinusoidal ``positional`` with endpoint, or random ``fourier``),
  model_channels * channel_mult_noise channels, with the [cos, sin] halves swapped to [sin, cos];
  + Linear(label_dim -> noise ch)(sqrt(label_dim) * one-hot labels) + Linear(augment_dim -> noise ch, no bias)(aug);
  then emb = SiLU(Linear(SiLU(Linear(e)))) with model_channels * channel_mult_emb channels.
  ``label_dropout`` p zeroes each sample's labels with probability p in training mode (global torch RNG);
  ``class_labels=None`` on a conditional net means all-zero labels (the unconditional / dropped-label input).
* Encoder: level 0 starts with a 3x3 conv (in_channels -> model_channels); every lower level starts with a
  downsampling UNetBlock; then ``num_blocks`` UNetBlocks to C_l (self-attention at ``attn_resolutions``). Every
  output is kept as a skip connection. ``encoder_type``:
    standard  no input-image path;
    skip      the input image is FIR-downsampled per level and added to the down block's output via a 1x1 conv;
    residual  a running aux image is downsampled by a fused FIR-down 3x3 conv and merged as
              x = aux = (x + conv(aux)) / sqrt(2) (NCSN++).
* Decoder (levels bottom-up): the bottom level starts with two UNetBlocks (the first with attention), other levels
  with an upsampling UNetBlock; then num_blocks + 1 UNetBlocks, each consuming one skip (channel concat), the last
  one with attention at ``attn_resolutions``. Output head GroupNorm -> SiLU -> conv3x3 (init x 1e-5) at level 0
  (``standard``), or at every level summed into an upsampled output pyramid (``skip``).
* Blocks: additive embedding (no adaptive scale), 1x1 projected skips when resampling, skip_scale sqrt(0.5),
  GroupNorm eps 1e-6, one attention head, xavier_uniform init, last conv of each residual branch x 1e-5,
  qkv conv x sqrt(0.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import (
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    check_unet_args,
    class_label_batch,
    noise_label_batch,
)

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


def _check_choice(kind: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} '{value}'; valid: {', '.join(valid)}")


def _layer_settings(emb_channels: int, dropout: float, resample_filter: Sequence[float]) -> tuple[dict, dict, dict]:
    """(init, init_zero, UNetBlock keyword arguments) of EDM's SongUNet: xavier_uniform init, x 1e-5 for the last
    conv of each residual branch, x sqrt(0.2) for the qkv conv; one head, skip_scale sqrt(0.5), GroupNorm eps 1e-6,
    1x1 projected resampling skips, additive embedding."""
    init = dict(init_mode="xavier_uniform")
    init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
    init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
    block_kwargs = dict(
        emb_channels=emb_channels,
        num_heads=1,
        dropout=dropout,
        skip_scale=math.sqrt(0.5),
        eps=1e-6,
        resample_filter=resample_filter,
        resample_proj=True,
        adaptive_scale=False,
        init=init,
        init_zero=init_zero,
        init_attn=init_attn,
    )
    return init, init_zero, block_kwargs


class SongUNet(nn.Module):
    """EDM's SongUNet (DDPM++ with positional/standard/standard, NCSN++ with fourier/residual/standard)."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
    ) -> None:
        super().__init__()
        _check_choice("embedding_type", embedding_type, EMBEDDING_TYPES)
        _check_choice("encoder_type", encoder_type, ENCODER_TYPES)
        _check_choice("decoder_type", decoder_type, DECODER_TYPES)
        channel_mult = check_unet_args(img_resolution, channel_mult, dropout, label_dropout)
        attn_resolutions = [int(r) for r in attn_resolutions]

        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        self.encoder_type = encoder_type
        self.decoder_type = decoder_type

        emb_channels = model_channels * channel_mult_emb
        init, init_zero, block_kwargs = _layer_settings(emb_channels, dropout, resample_filter)
        # Registration order (embedding, encoder, decoder) fixes the parameter order and the RNG draws of the init.
        self._build_embedding(embedding_type, model_channels * channel_mult_noise, emb_channels, init)
        cout = self._build_encoder(model_channels, channel_mult, num_blocks, attn_resolutions, resample_filter, init,
                                   block_kwargs)
        skip_channels = [m.out_channels for name, m in self.enc.items() if "_aux_" not in name]
        self._build_decoder(cout, skip_channels, model_channels, channel_mult, num_blocks, attn_resolutions,
                            resample_filter, init_zero, block_kwargs)

    def _build_embedding(self, embedding_type: str, noise_channels: int, emb_channels: int, init: dict) -> None:
        """Noise-level, class-label and augmentation-label embedding, then the two-layer MLP."""
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(self.label_dim, noise_channels, **init) if self.label_dim else None
        self.map_augment = (
            Linear(self.augment_dim, noise_channels, bias=False, **init) if self.augment_dim else None
        )
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

    def _build_encoder(self, model_channels: int, channel_mult: Sequence[int], num_blocks: int,
                       attn_resolutions: Sequence[int], resample_filter: Sequence[float], init: dict,
                       block_kwargs: dict) -> int:
        """``self.enc``; module names follow "{res}x{res}_{role}", roles starting with "aux" act on the image
        pyramid. Returns the channel count at the bottom."""
        self.enc = nn.ModuleDict()
        cout = self.in_channels
        caux = self.in_channels
        for level, mult in enumerate(channel_mult):
            res = self.img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, kernel=3, **init)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if self.encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, kernel=0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                elif self.encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs
                )
        return cout

    def _build_decoder(self, cout: int, skip_channels: list[int], model_channels: int, channel_mult: Sequence[int],
                       num_blocks: int, attn_resolutions: Sequence[int], resample_filter: Sequence[float],
                       init_zero: dict, block_kwargs: dict) -> None:
        """``self.dec``, consuming ``skip_channels`` (the encoder's outputs) from the end; blocks named
        "_block{idx}" take one skip each."""
        self.dec = nn.ModuleDict()
        self._dec_consumes_skip: dict[str, bool] = {}
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = self.img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                name = f"{res}x{res}_block{idx}"
                self.dec[name] = UNetBlock(
                    cin, cout, attention=(idx == num_blocks and res in attn_resolutions), **block_kwargs
                )
                self._dec_consumes_skip[name] = True
            if self.decoder_type == "skip" or level == 0:
                if self.decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        self.out_channels, self.out_channels, kernel=0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, self.out_channels, kernel=3, **init_zero)
        assert not skip_channels

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
        emb = emb.reshape(batch_size, 2, -1).flip(1).reshape(batch_size, -1)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            labels = class_label_batch(class_labels, batch_size, self.label_dim, emb, self.training,
                                       self.label_dropout)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [N, in_channels, R, R]; noise_labels: [N] (c_noise); class_labels: [N, label_dim] one-hot or None;
        augment_labels: [N, augment_dim] or None. Returns [N, out_channels, R, R].

        As in EDM, labels are ignored when the network was built with label_dim=0 / augment_dim=0.
        """
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape [N, {', '.join(map(str, expected))}], got {list(x.shape)}")
        emb = self.embed(noise_labels, x.shape[0], class_labels, augment_labels)

        # Encoder.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if name.endswith("_aux_down"):
                aux = block(aux)
            elif name.endswith("_aux_skip"):
                x = skips[-1] = x + block(aux)
            elif name.endswith("_aux_residual"):
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder.
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if name.endswith("_aux_up"):
                aux = block(aux)
            elif name.endswith("_aux_norm"):
                tmp = block(x)
            elif name.endswith("_aux_conv"):
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if self._dec_consumes_skip.get(name, False):
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux
