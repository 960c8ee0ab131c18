"""Tests for models/ (SongUNet, shared layers, registry).

References: the parameter counts of EDM's released networks (Karras et al. 2022, arXiv 2206.00364), closed-form
layer math re-computed here with different primitives (average pooling, nearest upsampling, numpy correlation,
explicit softmax attention, torch.nn.GroupNorm), and behavioural checks (conditioning, label dropout, overfitting a
batch).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from models import ARCHITECTURES, build_network, count_parameters
from models.layers import (
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    SelfAttention,
    UNetBlock,
    weight_init,
)
from models.song_unet import SongUNet

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


def load_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Parameter counts against EDM's published numbers (built on the meta device: no memory, no init cost).
# --------------------------------------------------------------------------------------------------------------
PUBLISHED_COUNTS = [
    # (config, overrides, resolution, label_dim, augment_dim, EDM parameter count)
    ("ddpmpp", {}, 32, 10, 9, 55_735_299),
    ("ddpmpp", {}, 32, 10, 0, 55_734_147),
    ("ddpmpp", {}, 32, 0, 9, 55_733_891),
    ("ddpmpp", {}, 32, 0, 0, 55_732_739),
    ("ncsnpp", {}, 32, 10, 9, 56_400_643),
    ("ncsnpp", {}, 32, 10, 0, 56_398_339),
    ("ncsnpp", {}, 32, 0, 9, 56_397_827),
    ("ncsnpp", {}, 32, 0, 0, 56_395_523),
    ("ddpmpp", {"channel_mult": [1, 2, 2, 2]}, 64, 0, 9, 61_805_571),
    ("ncsnpp", {"channel_mult": [1, 2, 2, 2]}, 64, 0, 9, 62_761_091),
    ("ddpmpp", {"model_channels": 32}, 32, 10, 0, 3_501_027),
]


@pytest.mark.parametrize("name,overrides,res,label_dim,augment_dim,expected", PUBLISHED_COUNTS)
def test_parameter_count_matches_edm(name, overrides, res, label_dim, augment_dim, expected):
    with torch.device("meta"):
        net = build_network(load_cfg(name, **overrides), res, 3, label_dim=label_dim, augment_dim=augment_dim)
    assert count_parameters(net) == expected


def test_fourier_frequencies_are_a_buffer_not_a_parameter():
    with torch.device("meta"):
        net = build_network(load_cfg("ncsnpp"), 32, 3)
    names = dict(net.named_buffers())
    assert "map_noise.freqs" in names
    assert all("freqs" not in n for n, _ in net.named_parameters())
    assert count_parameters(net, trainable_only=True) == count_parameters(net)


# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------
def test_weight_init_laws():
    torch.manual_seed(0)
    fan_in, fan_out = 300, 500
    w = weight_init([400, 400], "xavier_uniform", fan_in, fan_out)
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    w = weight_init([400, 400], "kaiming_uniform", fan_in, fan_out)
    assert w.abs().max() <= math.sqrt(3 / fan_in)
    w = weight_init([400, 400], "xavier_normal", fan_in, fan_out)
    assert w.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.02)
    w = weight_init([400, 400], "kaiming_normal", fan_in, fan_out)
    assert w.std().item() == pytest.approx(math.sqrt(1 / fan_in), rel=0.02)
    with pytest.raises(ValueError, match="unknown init_mode 'orthogonal'.*xavier_uniform"):
        weight_init([2, 2], "orthogonal", 2, 2)


def test_linear_init_scales_and_matches_matmul():
    torch.manual_seed(0)
    lin = Linear(20, 7, init_mode="xavier_uniform", init_weight=1e-5, init_bias=0.0)
    assert lin.weight.abs().max() <= 1e-5 * math.sqrt(6 / 27)
    assert torch.all(lin.bias == 0)
    lin = Linear(20, 7, bias=False)
    x = torch.randn(3, 20)
    torch.testing.assert_close(lin(x), x @ lin.weight.T)


def test_conv_box_filter_resampling_equals_pooling_and_nearest():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    down = Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 1])
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    up = Conv2d(3, 3, kernel=0, up=True, resample_filter=[1, 1])
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    assert count_parameters(down) == 0 and count_parameters(up) == 0

    # 3x3 conv + downsampling: unfused = pool then conv, fused = conv then pool.
    conv = Conv2d(3, 5, kernel=3, down=True, resample_filter=[1, 1], init_bias=1.0)
    ref = F.conv2d(F.avg_pool2d(x, 2), conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), ref)
    fused = Conv2d(3, 5, kernel=3, down=True, resample_filter=[1, 1], fused_resample=True)
    torch.testing.assert_close(fused(x), F.avg_pool2d(F.conv2d(x, fused.weight, fused.bias, padding=1), 2))
    fused_up = Conv2d(3, 5, kernel=3, up=True, resample_filter=[1, 1], fused_resample=True)
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), fused_up.weight, fused_up.bias, padding=1)
    torch.testing.assert_close(fused_up(x), ref)


def test_conv_binomial_downsampling_matches_numpy_correlation():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    down = Conv2d(2, 2, kernel=0, down=True, resample_filter=[1, 3, 3, 1]).double()
    f = np.array([1.0, 3.0, 3.0, 1.0])
    k = np.outer(f, f) / f.sum() ** 2
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))  # zero padding (4 - 1) // 2 = 1
    expected = np.zeros((1, 2, 4, 4))
    for i in range(4):
        for j in range(4):
            expected[..., i, j] = (xp[..., 2 * i : 2 * i + 4, 2 * j : 2 * j + 4] * k).sum(axis=(-1, -2))
    np.testing.assert_allclose(down(x).numpy(), expected, atol=1e-12)

    # Unit DC gain: a constant image stays constant away from the zero-padded border, both ways.
    const = torch.full((1, 1, 16, 16), 2.5)
    d = Conv2d(1, 1, kernel=0, down=True, resample_filter=[1, 3, 3, 1])(const)
    u = Conv2d(1, 1, kernel=0, up=True, resample_filter=[1, 3, 3, 1])(const)
    assert d.shape[-1] == 8 and u.shape[-1] == 32
    torch.testing.assert_close(d[..., 1:-1, 1:-1], torch.full_like(d[..., 1:-1, 1:-1], 2.5))
    torch.testing.assert_close(u[..., 2:-2, 2:-2], torch.full_like(u[..., 2:-2, 2:-2], 2.5))


def test_conv_argument_errors():
    with pytest.raises(ValueError, match="kernel must be 0"):
        Conv2d(3, 3, kernel=2)
    with pytest.raises(ValueError, match="kernel=0 needs in_channels == out_channels"):
        Conv2d(3, 4, kernel=0, down=True)
    with pytest.raises(ValueError, match="resample_filter"):
        Conv2d(3, 3, kernel=0, down=True, resample_filter=[])


@pytest.mark.parametrize("channels,groups", [(128, 32), (256, 32), (64, 16), (32, 8), (16, 4)])
def test_groupnorm_group_rule_matches_torch(channels, groups):
    torch.manual_seed(0)
    gn = GroupNorm(channels, eps=1e-6)
    assert gn.num_groups == groups
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    ref = torch.nn.GroupNorm(groups, channels, eps=1e-6)
    ref.load_state_dict(gn.state_dict())
    x = torch.randn(2, channels, 4, 4)
    torch.testing.assert_close(gn(x), ref(x))


def test_positional_embedding_closed_form():
    x = torch.tensor([0.0, 0.5, -3.0, 250.0])
    for endpoint in (False, True):
        emb = PositionalEmbedding(8, max_positions=10000, endpoint=endpoint)(x)
        denom = 3 if endpoint else 4
        for i in range(4):
            freq = 10000.0 ** (-i / denom)
            torch.testing.assert_close(emb[:, i], torch.cos(x * freq))
            torch.testing.assert_close(emb[:, 4 + i], torch.sin(x * freq))
    emb = PositionalEmbedding(8, endpoint=True)(torch.tensor([1e4]))
    assert emb[0, 3].item() == pytest.approx(math.cos(1.0), abs=1e-5)  # last frequency is exactly 1/max_positions


def test_fourier_embedding_closed_form_and_not_trained():
    torch.manual_seed(0)
    fe = FourierEmbedding(4096, scale=16)
    assert len(list(fe.parameters())) == 0
    assert fe.freqs.std().item() == pytest.approx(16, rel=0.05)
    x = torch.tensor([0.1, -0.7])
    emb = fe(x)
    phase = 2 * math.pi * x[:, None].double() * fe.freqs[None].double()
    torch.testing.assert_close(emb, torch.cat([phase.cos(), phase.sin()], dim=1).float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("heads", [1, 2])
def test_self_attention_matches_explicit_softmax(heads):
    torch.manual_seed(0)
    attn = SelfAttention(8, heads, init=dict(init_mode="xavier_uniform"), init_zero=dict(init_mode="xavier_uniform"))
    x = torch.randn(2, 8, 3, 3)
    h = attn.norm(x)
    qkv = torch.einsum("oc,nchw->nohw", attn.qkv.weight[:, :, 0, 0], h) + attn.qkv.bias[None, :, None, None]
    d = 8 // heads
    qkv = qkv.reshape(2, heads, d, 3, 9)  # channel layout [head, channel-in-head, q/k/v]
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    w = torch.softmax(torch.einsum("nhcq,nhck->nhqk", q, k) / math.sqrt(d), dim=-1)
    a = torch.einsum("nhqk,nhck->nhcq", w, v).reshape(2, 8, 3, 3)
    ref = torch.einsum("oc,nchw->nohw", attn.proj.weight[:, :, 0, 0], a) + attn.proj.bias[None, :, None, None]
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_unet_block_skip_paths_and_shapes():
    torch.manual_seed(0)
    emb = torch.randn(2, 16)
    x = torch.randn(2, 8, 8, 8)
    kw = dict(emb_channels=16, resample_filter=[1, 1])
    assert UNetBlock(8, 8, **kw).skip is None
    assert UNetBlock(8, 16, **kw).skip.kernel == 1
    assert UNetBlock(8, 8, down=True, **kw).skip.kernel == 0  # pure resample when no projection is asked
    assert UNetBlock(8, 8, down=True, resample_proj=True, **kw).skip.kernel == 1
    assert UNetBlock(8, 16, down=True, **kw)(x, emb).shape == (2, 16, 4, 4)
    up_block = UNetBlock(8, 8, up=True, attention=True, num_heads=2, adaptive_scale=False, **kw)
    assert up_block(x, emb).shape == (2, 8, 16, 16)
    # With a zero-initialised residual branch (default init_zero) a same-width block is exactly skip_scale * x.
    blk = UNetBlock(8, 8, skip_scale=0.5, **kw)
    torch.testing.assert_close(blk(x, emb), 0.5 * x)


# --------------------------------------------------------------------------------------------------------------
# SongUNet behaviour (unet_tiny config)
# --------------------------------------------------------------------------------------------------------------
def _perturb_output_layers(net: torch.nn.Module, std: float = 0.05) -> None:
    """Move every tiny-initialised last conv (init x 1e-5) away from ~0 so conditioning effects are visible."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("conv1.weight") or name.endswith("proj.weight") or "aux_conv" in name:
                p.normal_(0, std)


@pytest.mark.parametrize("res,channels", [(8, 1), (32, 3)])
@pytest.mark.parametrize("label_dim,augment_dim", [(0, 0), (10, 9)])
def test_unet_tiny_output_shape(res, channels, label_dim, augment_dim):
    torch.manual_seed(0)
    net = build_network(load_cfg("unet_tiny"), res, channels, label_dim=label_dim, augment_dim=augment_dim)
    n = 3
    x = torch.randn(n, channels, res, res)
    labels = F.one_hot(torch.arange(n) % 10, 10).float() if label_dim else None
    aug = torch.randn(n, augment_dim) if augment_dim else None
    out = net(x, torch.randn(n), labels, aug)
    assert out.shape == x.shape and torch.isfinite(out).all()
    if label_dim:
        assert net(x, torch.randn(n)).shape == x.shape  # labels optional


@pytest.mark.parametrize("encoder_type,decoder_type", [("skip", "skip"), ("residual", "standard")])
def test_aux_image_paths_run(encoder_type, decoder_type):
    torch.manual_seed(0)
    cfg = load_cfg(
        "unet_tiny",
        encoder_type=encoder_type,
        decoder_type=decoder_type,
        resample_filter=[1, 3, 3, 1],
        embedding_type="fourier",
        channel_mult_noise=2,
    )
    net = build_network(cfg, 8, 1)
    x = torch.randn(2, 1, 8, 8)
    assert net(x, torch.randn(2)).shape == x.shape
    names = list(net.enc.keys()) + list(net.dec.keys())
    if encoder_type == "skip":
        assert "4x4_aux_skip" in names and "8x8_aux_up" in names and "2x2_aux_conv" in names
    else:
        assert "4x4_aux_residual" in names and "2x2_aux_residual" in names


def test_class_conditioning_and_label_dropout():
    torch.manual_seed(0)
    cfg = load_cfg("unet_tiny", label_dropout=1.0)
    net = build_network(cfg, 8, 1, label_dim=10)
    _perturb_output_layers(net)
    x = torch.randn(4, 1, 8, 8)
    sigma = torch.full((4,), 0.3)
    y0 = F.one_hot(torch.tensor([0, 1, 2, 3]), 10).float()
    y1 = F.one_hot(torch.tensor([5, 6, 7, 8]), 10).float()
    net.eval()
    with torch.no_grad():
        out0, out1, out_none = net(x, sigma, y0), net(x, sigma, y1), net(x, sigma, None)
    assert (out0 - out1).abs().max() > 1e-3 * out0.abs().max()
    assert (out0 - out_none).abs().max() > 1e-3 * out0.abs().max()
    net.train()  # unet_tiny has dropout 0, so train mode only switches label dropout on
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma, y0), out_none)
        net.label_dropout = 0.0
        torch.testing.assert_close(net(x, sigma, y0), out0)
        # p = 0.5: every sample is either its labelled or its unlabelled output, and both occur.
        net.label_dropout = 0.5
        xb = x.repeat(8, 1, 1, 1)
        out = net(xb, sigma.repeat(8), y0.repeat(8, 1))
        kept = (out - out0.repeat(8, 1, 1, 1)).flatten(1).abs().amax(1) < 1e-6
        dropped = (out - out_none.repeat(8, 1, 1, 1)).flatten(1).abs().amax(1) < 1e-6
        assert torch.all(kept ^ dropped) and kept.any() and dropped.any()


def test_augment_labels_change_output():
    torch.manual_seed(0)
    net = build_network(load_cfg("unet_tiny"), 8, 1, augment_dim=9).eval()
    _perturb_output_layers(net)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        plain = net(x, torch.zeros(2))
        torch.testing.assert_close(net(x, torch.zeros(2), augment_labels=torch.zeros(2, 9)), plain)
        assert (net(x, torch.zeros(2), augment_labels=torch.ones(2, 9)) - plain).abs().max() > 1e-4


def test_songunet_argument_errors():
    with pytest.raises(ValueError, match="unknown embedding_type 'sinusoid'; valid: positional, fourier"):
        SongUNet(8, 1, 1, embedding_type="sinusoid")
    with pytest.raises(ValueError, match="unknown encoder_type 'x'; valid: standard, skip, residual"):
        SongUNet(8, 1, 1, encoder_type="x")
    with pytest.raises(ValueError, match="unknown decoder_type 'residual'; valid: standard, skip"):
        SongUNet(8, 1, 1, decoder_type="residual")
    with pytest.raises(ValueError, match=r"img_resolution=12 .*channel_mult=\[1, 2, 2, 2\] has 4 levels"):
        SongUNet(12, 1, 1, model_channels=16, channel_mult=(1, 2, 2, 2))
    net = SongUNet(8, 1, 1, label_dim=10, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=())
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.zeros(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="class_labels must be one-hot"):
        net(torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.zeros(2, 3))


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------
def test_build_network_errors_and_plain_dicts():
    assert ARCHITECTURES["songunet"] is SongUNet
    with pytest.raises(ValueError, match="unknown model.arch 'unetx'; valid choices: .*songunet"):
        build_network({"name": "foo", "arch": "unetx"}, 8, 1)
    with pytest.raises(ValueError, match="model=unet_tiny: unknown parameter.*channels; valid parameters: .*model_ch"):
        build_network(load_cfg("unet_tiny", channels=64), 8, 1)
    with pytest.raises(ValueError, match="'in_channels'.*data config"):
        build_network(load_cfg("unet_tiny", in_channels=3), 8, 1)
    with pytest.raises(ValueError, match="no 'arch' key"):
        build_network({"name": "foo"}, 8, 1)
    net = build_network(dict(arch="songunet", model_channels=16, channel_mult=[1, 2], num_blocks=1), 8, 2)
    assert isinstance(net, SongUNet) and net.in_channels == net.out_channels == 2


def test_unet_tiny_overfits_a_fixed_batch():
    torch.manual_seed(0)
    net = build_network(load_cfg("unet_tiny"), 8, 1, label_dim=10)
    x = torch.randn(8, 1, 8, 8)
    target = torch.randn(8, 1, 8, 8)
    sigma = torch.linspace(-1, 1, 8)
    labels = F.one_hot(torch.arange(8), 10).float()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        loss = (net(x, sigma, labels) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 100:
            break
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
