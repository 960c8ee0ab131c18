"""Tests for models/dit.py (DiT) and models/flops.py (FLOP counting).

References: the parameter counts of DiT's released models (Peebles & Xie 2023, arXiv 2212.09748) and forward Gflops
(Peebles & Xie 2023, Table 4: S/2 6.06, B/2 23.01, L/2 80.71, XL/2 118.64), a closed-form multiply-add count of the
transformer written out here, torch's F.unfold for the patch layout, an explicit einsum attention, the sin-cos
formulas evaluated with ``math``, and behavioural checks (adaLN-Zero identity, null class, conditioning).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from configs.model_sizes import canonical_model_config
from diffusion.preconditioning import EDMPrecond
from models import ARCHITECTURES, build_network, count_parameters
from models.dit import DIT_SIZES, DiT, DiTBlock, sincos_pos_embed_2d
from models.flops import count_flops, count_macs

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"
DIT_CONFIGS = [f"dit_{s}{p}" for s in ("s", "b", "l", "xl") for p in (2, 4, 8)]
SMALL = dict(depth=2, hidden_size=32, num_heads=4)


def load_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _perturb_zero_init(net: torch.nn.Module, std: float = 0.05) -> None:
    """Random weights for DiT's zero-initialised adaLN modulations and final linear."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.normal_(0, std)


# --------------------------------------------------------------------------------------------------------------
# Published parameter counts and Gflops (built on the meta device)
# --------------------------------------------------------------------------------------------------------------
PUBLISHED = [  # config, trainable, all incl. the frozen pos_embed (DiT models.py, 32x32x4, learn_sigma, 1000 classes)
    ("dit_s2", 32_865_056, 32_963_360),
    ("dit_b2", 130_315_808, 130_512_416),
    ("dit_l2", 457_840_672, 458_102_816),
    ("dit_xl2", 674_834_720, 675_129_632),
]


@pytest.mark.parametrize("name,trainable,total", PUBLISHED)
def test_parameter_counts_match_dit(name, trainable, total):
    with torch.device("meta"):
        net = build_network(load_cfg(name), 32, 4, label_dim=1000)
    assert isinstance(net, DiT) and ARCHITECTURES["dit"] is DiT
    assert count_parameters(net, trainable_only=True) == trainable
    assert count_parameters(net) == trainable  # the position embedding is a buffer, not a parameter
    assert count_parameters(net) + net.pos_embed.numel() == total
    assert count_parameters(EDMPrecond(net)) == trainable
    assert "pos_embed" in net.state_dict() and all(n != "pos_embed" for n, _ in net.named_parameters())
    # Without the learned-sigma channels the final linear loses hidden * p^2 * C outputs (weights and biases).
    with torch.device("meta"):
        plain = build_network(load_cfg(name, learn_sigma=False), 32, 4, label_dim=1000)
    assert count_parameters(plain) == trainable - (net.hidden_size + 1) * 2 * 2 * 4


def _closed_form_macs(
    depth: int,
    dim: int,
    patch: int,
    res: int = 32,
    cin: int = 4,
    classes: int = 1000,
    mlp_ratio: int = 4,
    learn_sigma: bool = True,
) -> int:
    """Multiply-adds of a DiT forward (batch 1), written out layer by layer."""
    tokens = (res // patch) ** 2
    cout = cin * (2 if learn_sigma else 1)
    embed = tokens * cin * patch * patch * dim + 256 * dim + dim * dim + classes * dim  # patches, t-MLP, labels
    block = 6 * dim * dim + tokens * (3 + 1 + 2 * mlp_ratio) * dim * dim + 2 * tokens * tokens * dim
    final = 2 * dim * dim + tokens * dim * patch * patch * cout
    return embed + depth * block + final


@pytest.mark.parametrize("name", DIT_CONFIGS)
def test_flops_equal_closed_form(name):
    cfg = load_cfg(name)
    with torch.device("meta"):
        net = build_network(cfg, 32, 4, label_dim=1000)
    depth, hidden_size, _ = DIT_SIZES[cfg.size]  # the config names its size; the table gives the dimensions
    expected = _closed_form_macs(depth, hidden_size, cfg.patch_size)
    flops = count_flops(net, 32, 4, label_dim=1000)
    assert flops == 2 * expected  # FlopCounterMode charges 2 FLOPs per multiply-add
    assert count_macs(net, 32, 4, label_dim=1000) == expected


@pytest.mark.parametrize("name,gflops", [("dit_s2", 6.06), ("dit_b2", 23.01), ("dit_l2", 80.71), ("dit_xl2", 118.64)])
def test_gflops_match_dit_paper(name, gflops):
    with torch.device("meta"):
        net = build_network(load_cfg(name), 32, 4, label_dim=1000)
    assert count_macs(net, 32, 4, label_dim=1000) / 1e9 == pytest.approx(gflops, rel=0.01)


def test_flop_counter_convention_and_cpu_attention():
    class OneConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 5, 3, padding=1)

        def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
            return self.conv(x)

    # 2 FLOPs per multiply-add: 5 outputs x 2 inputs x 9 taps per pixel, 8 x 8 pixels.
    assert count_flops(OneConv(), 8, 2) == 2 * 5 * 2 * 9 * 64
    assert count_flops(OneConv(), 8, 2, on_meta=False) == 2 * 5 * 2 * 9 * 64
    # A real CPU forward (flash-attention kernel) counts the same as the meta forward (attention as bmm).
    torch.manual_seed(0)
    net = DiT(16, 1, 1, label_dim=10, patch_size=2, **SMALL)
    meta = count_flops(net, 16, 1, label_dim=10)
    assert meta == count_flops(net, 16, 1, label_dim=10, on_meta=False)
    assert meta == 2 * _closed_form_macs(2, 32, 2, res=16, cin=1, classes=10)
    assert net.training  # mode restored


# --------------------------------------------------------------------------------------------------------------
# Layers and layout
# --------------------------------------------------------------------------------------------------------------
def test_sizes_and_configs_agree():
    for name in DIT_CONFIGS:
        cfg = load_cfg(name)
        size = name[4:-1].upper()
        assert cfg.size == size  # the config names its size; the table gives its dimensions
        full = canonical_model_config(cfg)
        assert (full["depth"], full["hidden_size"], full["num_heads"]) == DIT_SIZES[size]
        assert cfg.patch_size == int(name[-1]) and cfg.name == name and cfg.mlp_ratio == 4
    assert DIT_SIZES == {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    with torch.device("meta"):
        net = DiT(32, 4, 4, size="B", patch_size=4, depth=3)
    assert len(net.blocks) == 3 and net.hidden_size == 768


def test_position_embedding_closed_form():
    dim, grid = 16, 3
    pos = sincos_pos_embed_2d(dim, grid)
    assert pos.shape == (grid * grid, dim)
    q = dim // 4
    for i in range(grid):
        for j in range(grid):
            row = pos[i * grid + j]
            for k in range(q):
                w = 10000.0 ** (-k / q)
                expected = [math.sin(j * w), math.cos(j * w), math.sin(i * w), math.cos(i * w)]
                got = [row[k], row[q + k], row[2 * q + k], row[3 * q + k]]
                for e, g in zip(expected, got, strict=True):
                    assert g.item() == pytest.approx(e, abs=1e-6)
    net = DiT(16, 1, 1, patch_size=4, **SMALL)
    torch.testing.assert_close(net.pos_embed[0], sincos_pos_embed_2d(32, 4))
    assert not net.pos_embed.requires_grad


def test_timestep_frequency_embedding_closed_form():
    net = DiT(8, 1, 1, patch_size=2, **SMALL)
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = net.t_frequencies(t)
    k = torch.arange(128, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000.0) * k / 128)
    phase = t.double()[:, None] * freqs
    torch.testing.assert_close(emb.double(), torch.cat([phase.cos(), phase.sin()], 1), atol=2e-4, rtol=0)


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_unpatchify_inverts_unfold_layout(patch):
    """unpatchify of per-token features laid out [p_row, p_col, channel] rebuilds the image (reference: F.unfold)."""
    torch.manual_seed(0)
    net = DiT(8, 3, 3, patch_size=patch, learn_sigma=False, **SMALL)
    img = torch.randn(2, 3, 8, 8)
    cols = F.unfold(img, kernel_size=patch, stride=patch)  # [N, C * p * p (c, p_row, p_col), T (row-major)]
    tokens = cols.reshape(2, 3, patch, patch, -1).permute(0, 4, 2, 3, 1).reshape(2, -1, patch * patch * 3)
    torch.testing.assert_close(net.unpatchify(tokens), img, rtol=0, atol=0)


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    block = DiTBlock(16, num_heads=4)
    x = torch.randn(2, 5, 16)
    attn = block.attn
    qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(2, 5, 3, 4, 4)  # [N, T, q/k/v, head, d]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    w = torch.softmax(torch.einsum("nqhd,nkhd->nhqk", q, k) / 2.0, dim=-1)
    out = torch.einsum("nhqk,nkhd->nqhd", w, v).reshape(2, 5, 16) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), out, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# adaLN-Zero, conditioning, null class
# --------------------------------------------------------------------------------------------------------------
def test_fresh_block_is_identity_and_fresh_dit_outputs_zero():
    torch.manual_seed(0)
    block = DiTBlock(32, num_heads=4)
    x, c = torch.randn(3, 7, 32), torch.randn(3, 32)
    r1, r2 = block.residuals(x, c)
    assert torch.all(r1 == 0) and torch.all(r2 == 0)
    assert torch.equal(block(x, c), x)
    # Once the modulation is no longer zero, the residual branches are not.
    with torch.no_grad():
        block.adaLN_modulation.weight.normal_(0, 0.1)
    r1, r2 = block.residuals(x, c)
    assert r1.abs().max() > 0 and r2.abs().max() > 0

    net = DiT(16, 1, 1, label_dim=10, patch_size=2, **SMALL)
    out = net(torch.randn(2, 1, 16, 16), torch.randn(2), F.one_hot(torch.tensor([1, 2]), 10).float())
    assert out.shape == (2, 1, 16, 16) and torch.all(out == 0)


@pytest.mark.parametrize("patch,res", [(2, 16), (4, 16), (8, 32)])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_output_shapes(patch, res, learn_sigma):
    torch.manual_seed(0)
    net = DiT(res, 4, 4, label_dim=10, augment_dim=3, patch_size=patch, learn_sigma=learn_sigma, **SMALL)
    _perturb_zero_init(net)
    x = torch.randn(2, 4, res, res)
    out = net(x, torch.randn(2), F.one_hot(torch.tensor([0, 9]), 10).float(), torch.randn(2, 3))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() > 0
    assert net.final_layer.linear.out_features == patch * patch * 4 * (2 if learn_sigma else 1)
    if learn_sigma:  # the returned channels are the first half of DiT's output
        full = net.final_layer(net.patchify(x), torch.zeros(2, 32))
        assert net.unpatchify(full).shape[1] == 8


def test_learned_sigma_rows_get_no_gradient():
    torch.manual_seed(0)
    net = DiT(8, 2, 2, patch_size=2, learn_sigma=True, **SMALL)
    _perturb_zero_init(net)
    net(torch.randn(2, 2, 8, 8), torch.randn(2)).square().sum().backward()
    grad = net.final_layer.linear.weight.grad.reshape(2, 2, 4, -1)  # [p_row, p_col, channel, in]
    assert torch.all(grad[:, :, 2:] == 0) and grad[:, :, :2].abs().max() > 0


def test_class_conditioning_and_null_class():
    torch.manual_seed(0)
    net = DiT(16, 1, 1, label_dim=10, patch_size=2, **SMALL).eval()
    _perturb_zero_init(net)
    x = torch.randn(4, 1, 16, 16)
    c_noise = torch.full((4,), -0.3)
    y0 = F.one_hot(torch.tensor([0, 1, 2, 3]), 10).float()
    y1 = F.one_hot(torch.tensor([5, 6, 7, 8]), 10).float()
    with torch.no_grad():
        out0, out1, out_none = net(x, c_noise, y0), net(x, c_noise, y1), net(x, c_noise, None)
        assert (out0 - out1).abs().max() > 1e-3 * out0.abs().max()
        assert (out0 - out_none).abs().max() > 1e-3 * out0.abs().max()
        # An all-zero one-hot row (a dropped label) is the null class, exactly as class_labels=None.
        torch.testing.assert_close(net(x, c_noise, torch.zeros(4, 10)), out_none, rtol=0, atol=0)
        # One-hot rows pick table rows; the null row is the extra last one.
        c = net.embed(c_noise, 4, y0)
        t_only = net.t_mlp1(F.silu(net.t_mlp0(net.t_frequencies(c_noise * net.noise_label_scale))))
        torch.testing.assert_close(c - t_only, net.y_embedding[:4])
        torch.testing.assert_close(net.embed(c_noise, 4, None) - t_only, net.y_embedding[10:].expand(4, -1))
        mixed = torch.cat([y0[:2], torch.zeros(2, 10)])
        torch.testing.assert_close(net(x, c_noise, mixed), torch.cat([out0[:2], out_none[2:]]))
        # Label dropout inside the network (training mode) maps to the null class too.
        net.train()
        net.label_dropout = 1.0
        torch.testing.assert_close(net(x, c_noise, y0), out_none)


def test_noise_label_scale():
    torch.manual_seed(0)
    a = DiT(8, 1, 1, patch_size=2, noise_label_scale=1000.0, **SMALL)
    b = DiT(8, 1, 1, patch_size=2, noise_label_scale=1.0, **SMALL)
    b.load_state_dict(a.state_dict())
    _perturb_zero_init(a)
    b.load_state_dict(a.state_dict())
    x, c = torch.randn(3, 1, 8, 8), torch.tensor([-0.4, 0.1, 0.25])
    torch.testing.assert_close(a(x, c), b(x, 1000 * c))
    assert (a(x, c) - a(x, c + 0.01)).abs().max() > 0


def test_argument_errors():
    with pytest.raises(ValueError, match="unknown DiT size 'M'; valid: S, B, L, XL"):
        DiT(32, 4, 4, size="M")
    with pytest.raises(ValueError, match="needs a size .* or explicit depth, hidden_size, num_heads"):
        DiT(32, 4, 4)
    with pytest.raises(ValueError, match="img_resolution=12 must be a multiple of patch_size=8"):
        DiT(12, 4, 4, patch_size=8, **SMALL)
    with pytest.raises(ValueError, match="hidden_size=32 is not divisible into num_heads=5"):
        DiT(8, 4, 4, depth=1, hidden_size=32, num_heads=5)
    net = DiT(8, 1, 1, label_dim=10, **SMALL)
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.zeros(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="class_labels must be one-hot"):
        net(torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="model=dit_b2: unknown parameter.*size_x; valid parameters: .*size"):
        build_network(load_cfg("dit_b2", size_x=1), 32, 4)
