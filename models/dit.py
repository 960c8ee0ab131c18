"""DiT: the Diffusion Transformer of Peebles & Xie 2023 ("Scalable Diffusion Models with Transformers", arXiv
2212.09748), written from the paper's description, with its trainable parameter counts (DiT-S/2 32,865,056 ...
DiT-XL/2 674,834,720 at 32x32x4 latents, 1000 classes, learned sigma; tests/test_dit.py) and its forward Gflops.

Layout (input [N, C, R, R], patch size p, T = (R/p)^2 tokens, width D, ``depth`` blocks, ``num_heads`` heads):

* Patch embedding: a p x p stride-p convolution C -> D (= a Linear on each flattened p x p x C patch), plus a fixed
  2-D sin-cos position embedding (a persistent buffer ``pos_embed`` [1, T, D], not trained). For the token at
  grid row i, column j: pos = [s(j), s(i)] with s(u) = [sin(u w_k), cos(u w_k)], w_k = 10000^(-k / (D/4)),
  k < D/4 (the first half encodes the column, as DiT / MAE do). Tokens are in row-major (i, j) order.
* Conditioning vector c = t_emb + y_emb (+ Linear(augment_labels) when augment_dim > 0):
    t_emb = Linear(SiLU(Linear(phi(t)))), phi(t) = [cos(t f_k), sin(t f_k)], f_k = 10000^(-k/128), k < 128
            (256 frequency channels), t = noise_label_scale * c_noise;
    y_emb = a table of label_dim + 1 rows, the last row the *null class* (classifier-free guidance). With one-hot
            labels y [N, label_dim]: y_emb = y W[:label_dim] + (1 - sum(y)) W[label_dim], so a one-hot row picks
            its class row and an all-zero row (a dropped label: the training loop zeroes it) or
            ``class_labels=None`` picks the null row, exactly.
* DiT block (adaLN-Zero): (a1, b1, g1, a2, b2, g2) = Linear(SiLU(c)) (6 D, zero-initialised);
    x = x + g1 * Attn(LN(x) * (1 + b1) + a1)      (shift a, scale b, gate g; LN without affine, eps 1e-6)
    x = x + g2 * MLP(LN(x) * (1 + b2) + a2)       (MLP: D -> mlp_ratio D -> D, GELU tanh approximation)
  with multi-head softmax self-attention (qkv Linear with bias; qkv features laid out [q/k/v, head, dim]).
  Zero gates make a fresh block the identity.
* Final layer: (a, b) = Linear(SiLU(c)) (zero-init), out = Linear(LN(x) * (1 + b) + a) -> p * p * C_out per token
  (zero-init, so a fresh DiT outputs zeros), unpatchified with per-token features laid out [p_row, p_col, channel].
  ``learn_sigma``: C_out = 2 * out_channels as in DiT (the second half is DiT's variance output); EDM-style training
  has no use for it, so ``forward`` returns only the first out_channels channels (the extra output rows of the
  final Linear then never receive gradient). It exists so that parameter counts and Gflops match DiT's.
* Init: xavier_uniform weights / zero biases for every Linear and the patch embedding (its weight as a
  [D, C p^2] matrix), N(0, 0.02^2) for the timestep MLP weights and the label table, zeros as stated above.

Noise label: DiT's timestep embedder was designed for integer timesteps t in [0, 1000). Here it receives
t = ``noise_label_scale`` * c_noise. The default 1000 suits the preconditioners whose c_noise = 1/4 ln(sigma)
(edm, eps, x0, v): the typical training range of c_noise (about -1.5 .. 1.2 for sigma in [0.002, 80]) then spans
some 2700 timestep units, the same scale DiT's frequencies 1 .. 1e-4 were laid out for (top frequency: about one
radian per DiT step; lowest frequencies still resolve the whole sigma range). With ``precond=vp`` (c_noise = 999 t,
already DiT's timestep scale) set ``noise_label_scale: 1``.

Gflops: DiT's paper counts multiply-adds (fvcore convention); ``models.flops.count_flops`` returns
``torch.utils.flop_counter`` FLOPs = 2 x multiply-adds. The label embedding is a (one-hot) matrix product here, which
adds label_dim * D multiply-adds to DiT's table look-up (1.2 M of 118.6 G for XL/2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from configs.model_sizes import DIT_SIZES  # the one table of the DiT sizes (see DiT)
from models.layers import (
    Linear,
    PositionalEmbedding,
    check_label_dropout,
    class_label_batch,
    noise_label_batch,
    weight_init,
)

FREQUENCY_EMBEDDING_SIZE = 256


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid_size^2, dim] (see the module docstring), float32."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # token (i, j) at index i * grid_size + j

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        phase = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([phase.sin(), phase.cos()], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).to(torch.float32)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with per-sample [N, D] shift/scale broadcast over the tokens of x [N, T, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class Attention(nn.Module):
    """Multi-head softmax self-attention over tokens; qkv output features laid out [q/k/v, head, channel]."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"hidden_size={dim} is not divisible into num_heads={num_heads} heads")
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim, init_mode="xavier_uniform")
        self.proj = Linear(dim, dim, init_mode="xavier_uniform")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [N, heads, T, d_head]
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """Two-layer perceptron D -> hidden -> D with tanh-approximated GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden, init_mode="xavier_uniform")
        self.fc2 = Linear(hidden, dim, init_mode="xavier_uniform")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (see the module docstring)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = Linear(dim, 6 * dim, init_mode="xavier_uniform", init_weight=0.0)

    def residuals(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two gated residual branches: x1 = x + r1, out = x1 + r2; returns (r1, r2)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(F.silu(c)).chunk(6, dim=1)
        r1 = gate1.unsqueeze(1) * self.attn(_modulate(_layer_norm(x), shift1, scale1))
        r2 = gate2.unsqueeze(1) * self.mlp(_modulate(_layer_norm(x + r1), shift2, scale2))
        return r1, r2

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        r1, r2 = self.residuals(x, c)
        return x + r1 + r2


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + Linear to p*p*C_out features per token, both zero-initialised."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.adaLN_modulation = Linear(dim, 2 * dim, init_mode="xavier_uniform", init_weight=0.0)
        self.linear = Linear(dim, patch_size * patch_size * out_channels, init_mode="xavier_uniform", init_weight=0.0)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(F.silu(c)).chunk(2, dim=1)
        return self.linear(_modulate(_layer_norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer (see the module docstring). Interface as every models/ network.

    A DiT is named as in the paper: DiT-XL/2 is ``size="XL"``, ``patch_size=2``. The size ("S", "B", "L", "XL") sets
    depth / hidden_size / num_heads from ``DIT_SIZES`` (Peebles & Xie 2023, Table 1; the one table of the sizes, in
    ``configs.model_sizes``, which the model configs ``configs/model/dit_*.yaml`` select from). Each of those three,
    when given, overrides the size's value (reduced test networks, ``model.depth=6``); without a size all three are
    required — the spelling of configs written before the YAMLs named sizes, which so build the same network.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        size: str | None = None,
        patch_size: int = 2,
        depth: int | None = None,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = True,
        noise_label_scale: float = 1000.0,
        label_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if size is not None:
            if size not in DIT_SIZES:
                raise ValueError(f"unknown DiT size '{size}'; valid: {', '.join(DIT_SIZES)}")
            d, h, k = DIT_SIZES[size]
            depth = d if depth is None else depth
            hidden_size = h if hidden_size is None else hidden_size
            num_heads = k if num_heads is None else num_heads
        missing = [
            n for n, v in (("depth", depth), ("hidden_size", hidden_size), ("num_heads", num_heads)) if v is None
        ]
        if missing:
            raise ValueError(f"DiT needs a size ({', '.join(DIT_SIZES)}) or explicit {', '.join(missing)}")
        if patch_size < 1 or img_resolution % patch_size:
            raise ValueError(f"img_resolution={img_resolution} must be a multiple of patch_size={patch_size}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        check_label_dropout(label_dropout)

        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.learn_sigma = learn_sigma
        self.noise_label_scale = float(noise_label_scale)
        self.label_dropout = label_dropout
        self.grid_size = img_resolution // patch_size
        self.net_out_channels = out_channels * (2 if learn_sigma else 1)

        # Patch embedding (p x p, stride p convolution) and the fixed position embedding.
        fan_in = in_channels * patch_size * patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        with torch.no_grad():
            self.x_embedder.weight.copy_(
                weight_init(self.x_embedder.weight.shape, "xavier_uniform", fan_in=fan_in, fan_out=hidden_size)
            )
            self.x_embedder.bias.zero_()
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid_size).unsqueeze(0))

        # Conditioning: timestep MLP, label table (+ null row), optional augmentation labels.
        self.t_frequencies = PositionalEmbedding(FREQUENCY_EMBEDDING_SIZE, max_positions=10000, endpoint=False)
        self.t_mlp0 = Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size)
        self.t_mlp1 = Linear(hidden_size, hidden_size)
        self.y_embedding = nn.Parameter(torch.empty(label_dim + 1, hidden_size)) if label_dim else None
        self.map_augment = Linear(augment_dim, hidden_size, bias=False) if augment_dim else None
        with torch.no_grad():
            for p in (self.t_mlp0.weight, self.t_mlp1.weight, self.y_embedding):
                if p is not None:
                    p.normal_(0.0, 0.02)
            if self.map_augment is not None:
                self.map_augment.weight.normal_(0.0, 0.02)

        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.net_out_channels)

    def embed(
        self,
        noise_labels: torch.Tensor,
        batch_size: int,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The conditioning vector c [N, hidden_size] (see the module docstring)."""
        noise_labels = noise_label_batch(noise_labels, batch_size, self.t_mlp0.weight.device)
        c = self.t_mlp1(F.silu(self.t_mlp0(self.t_frequencies(noise_labels * self.noise_label_scale))))
        if self.y_embedding is not None:
            labels = class_label_batch(class_labels, batch_size, self.label_dim, c, self.training,
                                       self.label_dropout)
            table = self.y_embedding.to(c.dtype)
            null_weight = 1.0 - labels.sum(dim=1, keepdim=True)
            c = c + labels @ table[:-1] + null_weight * table[-1:]
        if self.map_augment is not None and augment_labels is not None:
            c = c + self.map_augment(augment_labels.to(c.dtype))
        return c

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, R, R] -> tokens [N, T, D] (patch embedding + position embedding)."""
        return self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, T, p*p*C'] (features laid out [p_row, p_col, channel]) -> [N, C', R, R]."""
        n, g, p, c = tokens.shape[0], self.grid_size, self.patch_size, self.net_out_channels
        x = tokens.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [N, C', grid_row, p_row, grid_col, p_col]
        return x.reshape(n, c, g * p, g * p)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [N, in_channels, R, R]; noise_labels: [N] (c_noise; the timestep embedder sees noise_label_scale times
        it); class_labels: [N, label_dim] one-hot (all-zero row = null class) or None (null class).
        Returns [N, out_channels, R, R] (with learn_sigma, the first out_channels of DiT's 2 * out_channels).
        """
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape [N, {', '.join(map(str, expected))}], got {list(x.shape)}")
        c = self.embed(noise_labels, x.shape[0], class_labels, augment_labels)
        h = self.patchify(x)
        for block in self.blocks:
            h = block(h, c)
        out = self.unpatchify(self.final_layer(h, c))
        return out[:, : self.out_channels] if self.learn_sigma else out
