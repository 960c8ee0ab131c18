"""Tests for models/edm2.py: EDM2's magnitude-preserving UNet (Karras et al. 2024, arXiv 2312.02696).

References, independent of the code under test: EDM2's published parameter counts (its Precond = UNet + the
128-weight u(sigma) head, label_dim 1000), closed-form statistics (E[silu(z)^2] by numerical quadrature, the
variance of a weighted sum of independent unit-variance inputs), a block re-computed here from explicit formulas
(rows divided by their L2 norm, einsum softmax attention, torch's own L2 normalisation), and behaviour (zero output
at initialisation, gradient flow, memorising a batch of digits).

Magnitude tolerances: a layer's output magnitude (mean square) is estimated from n independent groups of samples
(independent images, rows or -- for Fourier features, whose randomness is per channel -- channels); the test
requires |estimate - expected| < 5 standard errors, the standard error being the sample std of the n group means
over sqrt(n) (no distributional assumption; a correct layer fails with probability < 1e-6 under a normal
approximation), and requires that standard error itself to be < 0.005, so that a 2% magnitude error cannot pass.
Inputs are seeded, so the outcome is deterministic.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from models.edm2 import (
    EDM2_SIZES,
    EDM2Block,
    EDM2LogVar,
    EDM2UNet,
    MPConv,
    MPFourier,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
)
from training.run_info import describe

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"

# EDM2's published Precond parameter counts (label_dim 1000): UNet + logvar_linear (128 weights).
PUBLISHED = {
    ("xxs", 4): 31_309_029, ("xs", 4): 124_713_253, ("s", 4): 280_212_837, ("m", 4): 497_807_781,
    ("l", 4): 777_498_085, ("xl", 4): 1_119_283_749, ("xxl", 4): 1_523_164_773,
    ("xs", 3): 124_710_949, ("s", 3): 280_209_381, ("m", 3): 497_803_173, ("l", 3): 777_492_325,
    ("xl", 3): 1_119_276_837,
}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_kwargs(name: str, **overrides) -> dict:
    """A configs/model YAML as constructor kwargs (without name/arch)."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"))
    assert cfg.pop("name") == name and cfg.pop("arch") == "edm2unet"
    cfg.update(overrides)
    return cfg


def tiny(label_dim: int = 10, res: int = 8, channels: int = 1, **overrides) -> EDM2UNet:
    return EDM2UNet(res, channels, channels, label_dim=label_dim, **load_kwargs("edm2_tiny", **overrides))


def open_gains(net: torch.nn.Module, value: float = 0.7) -> None:
    """Set every zero-initialised scalar gain (emb_gain, out_gain) to ``value`` so that every path is active."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("emb_gain") or name.endswith("out_gain"):
                p.fill_(value)


def assert_magnitude(y: torch.Tensor, expected: float = 1.0) -> None:
    """Mean square of ``y`` equals ``expected`` within 5 standard errors (rows of ``y``: independent groups); the
    standard error must be below 0.5% of ``expected``."""
    groups = y.double().flatten(1).square().mean(1)
    mean, se = groups.mean().item(), (groups.std() / math.sqrt(len(groups))).item()
    assert se < 0.005 * expected, f"too few samples for a meaningful test (standard error {se:.4f})"
    assert abs(mean - expected) < 5 * se, f"mean square {mean:.5f}, expected {expected} +- {5 * se:.5f}"


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts (to the unit) and presets
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,channels", sorted(PUBLISHED))
def test_parameter_counts_equal_edm2_published(size, channels):
    with torch.device("meta"):  # no allocation: XXL builds in milliseconds
        unet = EDM2UNet(64, channels, channels, label_dim=1000, size=size)
        head = EDM2LogVar()
    assert n_params(head) == 128
    assert n_params(unet) + n_params(head) == PUBLISHED[size, channels]
    # what a run logs (and dry_run=true prints) with weighting=edm2_uncertainty: the UNet, u(σ) and EDM2's total
    data = type("Latents", (), {"name": "img512", "num_channels": channels, "resolution": 64, "label_dim": 1000,
                                "__len__": lambda self: 1})()
    assert describe(unet, data, head).endswith(f"parameters: {n_params(unet)} + 128 of the learned u(sigma) = "
                                               f"{PUBLISHED[size, channels]}")


@pytest.mark.parametrize("size", ["xxs", "xxl"])
def test_unpublished_img64_counts_follow_from_the_input_width(size):
    """No img64 XXS/XXL is published; one image channel fewer removes C0 * 9 weights from the input conv and from
    the output conv each (the constant-1 channel stays)."""
    with torch.device("meta"):
        c3 = n_params(EDM2UNet(64, 3, 3, label_dim=1000, size=size))
    assert c3 + 128 == PUBLISHED[size, 4] - 2 * 9 * EDM2_SIZES[size][0]


@pytest.mark.parametrize("size", list(EDM2_SIZES))
@pytest.mark.parametrize("channels", [4, 3])
def test_presets_build_each_size(size, channels):
    with torch.device("meta"):
        net = EDM2UNet(64, channels, channels, label_dim=1000, **load_kwargs(f"edm2_{size}"))
    model_channels, dropout = EDM2_SIZES[size]
    assert net.enc["64x64_conv"].out_channels == model_channels
    assert all(b.dropout == dropout for b in net.modules() if isinstance(b, EDM2Block))
    if (size, channels) in PUBLISHED:
        assert n_params(net) + 128 == PUBLISHED[size, channels]


def test_size_table_and_overrides():
    assert [EDM2_SIZES[s][0] for s in ("xxs", "xs", "s", "m", "l", "xl", "xxl")] == [64, 128, 192, 256, 320, 384, 448]
    assert [EDM2_SIZES[s][1] for s in ("xxs", "xs", "s", "m", "l", "xl", "xxl")] == [0, 0, 0, 0.1, 0.1, 0.1, 0.1]
    with torch.device("meta"):
        net = EDM2UNet(64, 4, 4, size="m", model_channels=64, dropout=0.0)
        ref = EDM2UNet(64, 4, 4, size="xxs")
        attn = [name for name, b in ref.named_modules() if isinstance(b, EDM2Block) and b.num_heads]
    assert n_params(net) == n_params(ref)
    # Attention at 16x16 and 8x8 (64 channels per head); at 8x8 every decoder block, and dec 8x8_in0, attend.
    assert attn == ["enc.16x16_block0", "enc.16x16_block1", "enc.16x16_block2", "enc.8x8_block0", "enc.8x8_block1",
                    "enc.8x8_block2", "dec.8x8_in0", "dec.8x8_block0", "dec.8x8_block1", "dec.8x8_block2",
                    "dec.8x8_block3", "dec.16x16_block0", "dec.16x16_block1", "dec.16x16_block2", "dec.16x16_block3"]
    assert ref.dec["16x16_block0"].num_heads == 3 and ref.dec["8x8_block0"].num_heads == 4
    assert ref.emb_noise.in_channels == 64 and ref.emb_noise.out_channels == 256  # cnoise = C, cemb = 4C


def test_argument_errors():
    with pytest.raises(ValueError, match="unknown EDM2 size 'xxxl'; valid: xxs, xs, s, m, l, xl, xxl"):
        EDM2UNet(64, 4, 4, size="xxxl")
    with pytest.raises(ValueError, match="needs a size"):
        EDM2UNet(64, 4, 4)
    with pytest.raises(ValueError, match="no augmentation-label input"):
        tiny(augment_dim=9)
    with pytest.raises(ValueError, match="channels_per_head=64"):
        tiny(channels_per_head=64)
    with pytest.raises(ValueError, match="img_resolution=12"):
        EDM2UNet(12, 1, 1, size="xxs")
    with pytest.raises(ValueError, match="res_balance"):
        tiny(res_balance=1.5)
    with pytest.raises(ValueError, match="kernel must be 0"):
        MPConv(4, 4, kernel=2)
    net = tiny()
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.zeros(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="augment_labels=None"):
        net(torch.zeros(1, 1, 8, 8), torch.zeros(1), augment_labels=torch.zeros(1, 9))


# ---------------------------------------------------------------------------------------------------------------
# Magnitude preservation of each MP layer (tolerances: module docstring)
# ---------------------------------------------------------------------------------------------------------------
def test_mp_silu_has_unit_magnitude():
    z = np.linspace(-40.0, 40.0, 800_001)
    silu = z / (1 + np.exp(-z))
    second_moment = np.sum(silu**2 * np.exp(-z * z / 2)) * (z[1] - z[0]) / math.sqrt(2 * math.pi)
    assert math.sqrt(second_moment) == pytest.approx(0.596, abs=5e-4)  # EDM2's constant, rounded to 3 digits
    expected = second_moment / 0.596**2  # 1.0016: the rounding
    x = torch.randn(4000, 1000, generator=torch.Generator().manual_seed(0))
    assert_magnitude(mp_silu(x), expected)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.9])
def test_mp_sum_has_unit_magnitude(t):
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2000, 1000, generator=gen), torch.randn(2000, 1000, generator=gen)
    assert_magnitude(mp_sum(a, b, t))
    torch.testing.assert_close(mp_sum(a, b, t), ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2))


@pytest.mark.parametrize("t", [0.3, 0.5, 0.8])
def test_mp_cat_has_unit_magnitude_and_shares_it_by_t(t):
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(4000, 24, 4, 4, generator=gen), torch.randn(4000, 40, 4, 4, generator=gen)
    y = mp_cat(a, b, t=t)
    assert y.shape == (4000, 64, 4, 4)
    assert_magnitude(y)
    # b's share of the output energy is t^2 / ((1-t)^2 + t^2), whatever the widths.
    share = y[:, 24:].square().sum() / y.square().sum()
    assert share.item() == pytest.approx(t**2 / ((1 - t) ** 2 + t**2), abs=0.01)
    c = math.sqrt(64 / ((1 - t) ** 2 + t**2))
    torch.testing.assert_close(y, torch.cat([a * c * (1 - t) / math.sqrt(24), b * c * t / math.sqrt(40)], dim=1))


@pytest.mark.parametrize("gain", [1.0, 2.5])
def test_mpconv_fully_connected_has_magnitude_gain(gain):
    torch.manual_seed(3)
    layer = MPConv(64, 48, kernel=0)
    with torch.no_grad():
        layer.weight.mul_(5.0)  # any stored scale: only directions matter
    x = torch.randn(40000, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = layer(x, gain=gain)
    assert_magnitude(y.reshape(2000, -1), gain**2)  # rows of 20 input vectors, independent of each other


def test_mpconv_3x3_has_unit_magnitude_away_from_the_border():
    torch.manual_seed(5)
    layer = MPConv(16, 24, kernel=3)
    x = torch.randn(2000, 16, 10, 10, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y = layer(x)
    assert_magnitude(y[:, :, 1:-1, 1:-1])  # zero padding lowers the magnitude on the border pixels


def test_mp_fourier_has_unit_magnitude():
    torch.manual_seed(7)
    emb = MPFourier(65536)
    x = torch.randn(64, generator=torch.Generator().manual_seed(8))
    y = emb(x)  # [64, 65536]
    assert_magnitude(y.T)  # the random phases and frequencies are per channel: channels are the independent groups
    phase = 2 * math.pi * (x[:, None].double() * emb.freqs.double() + emb.phases.double())
    torch.testing.assert_close(y, (phase.cos() * math.sqrt(2)).float(), atol=2e-4, rtol=0)
    assert not list(emb.parameters()) and {"freqs", "phases"} <= dict(emb.named_buffers()).keys()


def test_pixel_norm_gives_unit_magnitude_per_pixel():
    x = 7.0 * torch.randn(4, 32, 5, 5, generator=torch.Generator().manual_seed(9)) + 3.0
    y = normalize(x, dim=1)
    per_pixel = y.square().mean(dim=1)
    torch.testing.assert_close(per_pixel, torch.ones_like(per_pixel), atol=1e-3, rtol=0)  # exact up to eps = 1e-4
    torch.testing.assert_close(y, x / x.norm(dim=1, keepdim=True) * math.sqrt(32), atol=1e-4, rtol=1e-4)


def test_network_activations_stay_near_unit_magnitude_at_init():
    """Not a law, a sanity check of the design: every block output of a fresh net has magnitude in [0.5, 2]."""
    torch.manual_seed(10)
    net = EDM2UNet(32, 3, 3, label_dim=10, model_channels=32, channel_mult=[1, 2], num_blocks=2,
                   attn_resolutions=[16], channels_per_head=32).eval()
    open_gains(net)
    rms = {}
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: rms.__setitem__(n, o.square().mean().sqrt().item()))
             for n, b in net.named_modules() if isinstance(b, EDM2Block)]
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        net(x, torch.randn(16), F.one_hot(torch.arange(16) % 10, 10).float())
    for h in hooks:
        h.remove()
    assert len(rms) == len([b for b in net.modules() if isinstance(b, EDM2Block)])
    assert all(0.5 < v < 2.0 for v in rms.values()), rms


# ---------------------------------------------------------------------------------------------------------------
# Forced weight normalisation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", [0, 1, 3])
def test_forced_weight_normalisation(kernel):
    torch.manual_seed(11)
    layer = MPConv(12, 20, kernel=kernel)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(20, *[1] * (layer.weight.ndim - 1)) * 10 + 0.1)  # rows of unequal norms
    fan_in = 12 * max(kernel, 1) ** 2
    x = torch.randn(3, 12, 6, 6) if kernel else torch.randn(3, 12)
    gain = torch.tensor(1.7, requires_grad=True)

    def reference(w: torch.Tensor) -> torch.Tensor:
        w = w / w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1)) * gain
        return F.conv2d(x, w, padding=kernel // 2) if kernel else x @ w.T

    stored = layer.weight.detach().clone()
    layer.eval()
    # normalize() divides by (RMS + 1e-4): relative error <= 1e-4 / RMS, and the rows' RMS is >= ~0.1 here.
    torch.testing.assert_close(layer(x, gain=gain), reference(stored), rtol=2e-3, atol=1e-5)
    assert torch.equal(layer.weight, stored)  # evaluation leaves the stored weights alone

    layer.train()
    y = layer(x, gain=gain)
    torch.testing.assert_close(y, reference(stored), rtol=2e-3, atol=1e-5)  # the same function (scale invariant)
    row_norms = layer.weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(row_norms, torch.full_like(row_norms, math.sqrt(fan_in)), rtol=1e-3, atol=0)
    # The gradient reaches the stored weight orthogonally to each row (it cannot change the row norms).
    y.square().sum().backward()
    g, w = layer.weight.grad.flatten(1), layer.weight.detach().flatten(1)
    cos = (g * w).sum(1) / (g.norm(dim=1) * w.norm(dim=1))
    assert cos.abs().max() < 1e-3
    assert gain.grad is not None and gain.grad.abs() > 0


def test_two_training_forwards_before_one_backward():
    """The in-place re-normalisation of a second forward must not break the first forward's graph."""
    torch.manual_seed(22)
    net = tiny().train()
    open_gains(net)
    x, noise = torch.randn(2, 1, 8, 8), torch.randn(2)
    first = net(x, noise).square().sum()
    second = net(x, noise).square().sum()
    (first + second).backward()
    assert net.out_conv.weight.grad is not None and torch.isfinite(net.out_conv.weight.grad).all()


def test_training_forward_normalises_every_weight_of_the_network():
    torch.manual_seed(12)
    net = tiny().train()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, MPConv):
                m.weight.mul_(3.0)
    net(torch.randn(2, 1, 8, 8), torch.randn(2), F.one_hot(torch.tensor([1, 2]), 10).float())
    convs = [m for m in net.modules() if isinstance(m, MPConv)]
    assert len(convs) > 20
    for m in convs:
        rms = m.weight.detach().flatten(1).square().mean(1).sqrt()  # per output channel
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Blocks against an explicit re-computation
# ---------------------------------------------------------------------------------------------------------------
def _conv(layer: MPConv, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
    """gain * w_i / (RMS(w_i) + 1e-4) / sqrt(fan_in): w_i / ||w_i|| * gain up to EDM2's epsilon."""
    w = layer.weight
    fan_in = w[0].numel()
    w = _unit_rms(w.flatten(1), 1).reshape(w.shape) * gain / math.sqrt(fan_in)
    return F.conv2d(x, w, padding=layer.kernel // 2) if layer.kernel else x @ w.T


def _unit_rms(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t / (RMS over ``dim`` + 1e-4): EDM2's normalisation with its epsilon, written with a mean of squares."""
    return t / (t.square().mean(dim=dim, keepdim=True).sqrt() + 1e-4)


def _reference_block(b: EDM2Block, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    silu = lambda v: v * torch.sigmoid(v) / 0.596  # noqa: E731
    if b.resample == "down":
        x = x.reshape(*x.shape[:2], x.shape[2] // 2, 2, x.shape[3] // 2, 2).mean(dim=(3, 5))
    elif b.resample == "up":
        x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    if b.flavor == "enc":
        x = _conv(b.conv_skip, x) if b.conv_skip is not None else x
        x = _unit_rms(x, 1)
    y = _conv(b.conv_res0, silu(x))
    y = silu(y * (1 + _conv(b.emb_linear, emb, b.emb_gain))[:, :, None, None])
    y = _conv(b.conv_res1, y)
    if b.flavor == "dec" and b.conv_skip is not None:
        x = _conv(b.conv_skip, x)
    x = (0.7 * x + 0.3 * y) / math.sqrt(0.7**2 + 0.3**2)
    if b.num_heads:
        n, c, h, w = x.shape
        qkv = _conv(b.attn_qkv, x).reshape(n, b.num_heads, c // b.num_heads, 3, h * w)
        d = c // b.num_heads
        q, k, v = (_unit_rms(t, 2) for t in qkv.unbind(3))  # [n, heads, d, hw]
        att = torch.softmax(torch.einsum("nhcq,nhck->nhqk", q, k) / math.sqrt(d), dim=-1)
        y = _conv(b.attn_proj, torch.einsum("nhqk,nhck->nhcq", att, v).reshape(n, c, h, w))
        x = (0.7 * x + 0.3 * y) / math.sqrt(0.7**2 + 0.3**2)
    return x.clamp(-256, 256)


@pytest.mark.parametrize(
    "cin,cout,flavor,resample,attention",
    [(8, 16, "enc", "keep", True), (16, 16, "enc", "down", False), (24, 16, "dec", "keep", True),
     (16, 16, "dec", "up", False)],
)
def test_block_matches_explicit_formulas(cin, cout, flavor, resample, attention):
    torch.manual_seed(13)
    b = EDM2Block(cin, cout, 12, flavor=flavor, resample=resample, attention=attention, channels_per_head=8).eval()
    open_gains(b)
    x, emb = torch.randn(2, cin, 8, 8), torch.randn(2, 12)
    with torch.no_grad():
        out, ref = b(x, emb), _reference_block(b, x, emb)
    assert b.num_heads == (2 if attention else 0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_block_clamps_activations():
    torch.manual_seed(14)
    x, emb = 50 * torch.randn(2, 8, 4, 4), torch.randn(2, 8)
    dec = EDM2Block(8, 8, 8, flavor="dec", clip_act=1.5).eval()
    with torch.no_grad():
        assert dec(x, emb).abs().max() == 1.5
        dec.clip_act = None
        assert dec(x, emb).abs().max() > 20


# ---------------------------------------------------------------------------------------------------------------
# Network behaviour and interface
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True])
def test_fresh_network_outputs_exactly_zero(train):
    torch.manual_seed(15)
    net = tiny().train(train)
    out = net(torch.randn(3, 1, 8, 8), torch.randn(3), F.one_hot(torch.tensor([0, 4, 9]), 10).float())
    assert net.out_gain.item() == 0.0 and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("res,channels", [(8, 1), (16, 4), (32, 3)])
@pytest.mark.parametrize("label_dim", [0, 10])
def test_forward_shapes(res, channels, label_dim):
    torch.manual_seed(16)
    net = tiny(label_dim=label_dim, res=res, channels=channels)
    open_gains(net)
    x = torch.randn(3, channels, res, res)
    labels = F.one_hot(torch.arange(3), 10).float() if label_dim else None
    out = net(x, torch.randn(3), labels)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert net(x, torch.tensor(0.3)).shape == x.shape  # labels optional, one noise label broadcast


def test_gradients_reach_every_parameter():
    torch.manual_seed(17)
    net = tiny()
    x, noise, labels = torch.randn(4, 1, 8, 8), torch.randn(4), F.one_hot(torch.arange(4), 10).float()
    (net(x, noise, labels) * torch.randn(4, 1, 8, 8)).sum().backward()
    nonzero = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert nonzero == {"out_gain"}  # every other path is multiplied by out_gain = 0 (or emb_gain = 0)
    open_gains(net)
    net.zero_grad()
    (net(x, noise, labels) * torch.randn(4, 1, 8, 8)).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_conditioning_labels_noise_and_label_dropout():
    torch.manual_seed(18)
    net = tiny(label_dropout=1.0).eval()
    open_gains(net)
    x, noise = torch.randn(4, 1, 8, 8), torch.full((4,), 0.2)
    y0, y1 = F.one_hot(torch.tensor([0, 1, 2, 3]), 10).float(), F.one_hot(torch.tensor([5, 6, 7, 8]), 10).float()
    with torch.no_grad():
        net.train()(x, noise)  # normalise the stored weights once, so that train and eval mode compute one function
        net.eval()
        out0, out1, none = net(x, noise, y0), net(x, noise, y1), net(x, noise)
        assert (out0 - out1).abs().max() > 1e-3 and (out0 - none).abs().max() > 1e-3
        assert (net(x, torch.full((4,), -1.0), y0) - out0).abs().max() > 1e-3
        torch.testing.assert_close(net(x, noise, torch.zeros(4, 10)), none)  # None = the all-zero (null) label
        net.train()  # label_dropout 1 drops every label; dropout 0, so nothing else is random
        torch.testing.assert_close(net(x, noise, y0), none)


def test_dropout_is_active_in_training_only():
    torch.manual_seed(19)
    net = tiny(dropout=0.1)
    open_gains(net)
    assert all(b.dropout == 0.1 for b in net.modules() if isinstance(b, EDM2Block))
    x, noise = torch.randn(2, 1, 8, 8), torch.randn(2)
    with torch.no_grad():
        net.eval()
        torch.testing.assert_close(net(x, noise), net(x, noise))
        net.train()
        assert (net(x, noise) - net(x, noise)).abs().max() > 0


def test_runs_in_bfloat16():
    torch.manual_seed(20)
    net = tiny().to(torch.bfloat16).eval()
    open_gains(net)
    with torch.no_grad():
        out = net(torch.randn(2, 1, 8, 8, dtype=torch.bfloat16), torch.randn(2))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_logvar_head():
    torch.manual_seed(21)
    head = EDM2LogVar()
    assert n_params(head) == 128 and head.linear.weight.shape == (1, 128)
    c_noise = torch.log(torch.tensor([0.002, 0.5, 80.0])) / 4
    u = head(c_noise)
    assert u.shape == (3,)
    feats = torch.cos(2 * math.pi * (c_noise[:, None] * head.fourier.freqs + head.fourier.phases)) * math.sqrt(2)
    torch.testing.assert_close(u, _conv(head.linear, feats).flatten(), atol=1e-6, rtol=1e-5)
    w = head.linear.weight  # up to EDM2's epsilon (1e-4 relative), the weight is used as w / ||w||
    torch.testing.assert_close(u, (feats @ (w / w.norm()).T).flatten(), atol=1e-5, rtol=2e-4)
    assert head(torch.tensor(0.1)).shape == (1,)


def test_flops_are_counted():
    from models.flops import count_macs

    net = tiny()
    macs = count_macs(net, 8, 1, label_dim=10)
    assert macs > 0 and macs == count_macs(net, 8, 1, label_dim=10, on_meta=False)
    with torch.device("meta"):
        s512 = EDM2UNet(64, 4, 4, label_dim=1000, size="s")
    macs = count_macs(s512, 64, 4, label_dim=1000)
    print(f"EDM2-S at 64x64x4: {macs / 1e9:.2f} G multiply-adds per forward")
    assert 90e9 < macs < 110e9  # 100.8 G measured (FlopCounterMode: matmuls, convolutions, attention)


def test_edm2_tiny_memorises_a_batch_of_digits():
    """With EDM's preconditioning (as EDM2 uses it) and the EDM-weighted loss, edm2_tiny memorises 8 digits."""
    from data.digits import DigitsDataset
    from diffusion.preconditioning import EDMPrecond

    ds = DigitsDataset(resolution=8, cond=True)
    y = torch.stack([torch.as_tensor(ds[i][0]) for i in range(8)]).float() / 127.5 - 1
    labels = F.one_hot(torch.as_tensor([int(ds[i][1]) for i in range(8)]), 10).float()
    torch.manual_seed(0)
    denoiser = EDMPrecond(tiny(), sigma_data=0.5)
    sigma = torch.exp(torch.linspace(-1.5, 0.5, 8))
    x = y + sigma[:, None, None, None] * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    weight = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2)[:, None, None, None]
    opt = torch.optim.Adam(denoiser.parameters(), lr=1e-2, betas=(0.9, 0.99))
    losses = []
    for _ in range(300):
        loss = (weight * (denoiser(x, sigma, labels) - y).square()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 10:
            break
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1], len(losses))
