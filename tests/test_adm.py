"""Tests for models/adm.py (EDM's ADM / DhariwalUNet).

References: the parameter count of EDM's released ADM (Karras et al. 2022, arXiv 2206.00364: 295,899,267 for
EDMPrecond + DhariwalUNet at ImageNet-64 with 1000 classes), the ADM layout (attention at 32/16/8 with 64 channels
per head), PyTorch's own default-init bound for the kaiming_uniform x sqrt(1/3) law, an explicit re-computation of
the embedding formula, and behavioural checks (zero output at init, conditioning, null label, dropout).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from diffusion.preconditioning import EDMPrecond
from models import ARCHITECTURES, build_network, count_parameters
from models.adm import DhariwalUNet
from models.layers import UNetBlock

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"
SMALL = dict(model_channels=16, channels_per_head=16, num_blocks=1, dropout=0.0)


def load_cfg(name: str = "adm", **overrides):
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@pytest.fixture(scope="module")
def adm_meta():
    with torch.device("meta"):
        return build_network(load_cfg(), 64, 3, label_dim=1000, augment_dim=0)


def _perturb_zero_init(net: torch.nn.Module, std: float = 0.05) -> None:
    """Give the zero-initialised last convs (residual branches, attention projections, output) random weights."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("conv1.weight", "proj.weight", "out_conv.weight")):
                p.normal_(0, std)


def test_parameter_count_matches_edm(adm_meta):
    assert ARCHITECTURES["dhariwalunet"] is DhariwalUNet
    assert isinstance(adm_meta, DhariwalUNet)
    assert count_parameters(adm_meta) == 295_899_267
    assert count_parameters(adm_meta, trainable_only=True) == 295_899_267
    assert count_parameters(EDMPrecond(adm_meta)) == 295_899_267  # the preconditioner adds none
    # The class table is label_dim x (4 * 192) with no bias: removing the labels removes exactly that many.
    with torch.device("meta"):
        uncond = build_network(load_cfg(), 64, 3, label_dim=0)
    assert count_parameters(uncond) == 295_899_267 - 1000 * 768


def test_attention_layout_matches_adm(adm_meta):
    """Attention at 32, 16 and 8 (every encoder block and every decoder block there), 64 channels per head."""
    heads = {f"enc.{k}": b.num_heads for k, b in adm_meta.enc.items() if isinstance(b, UNetBlock)}
    heads.update({f"dec.{k}": b.num_heads for k, b in adm_meta.dec.items()})
    attended = {k: h for k, h in heads.items() if h}
    res_of = {k: int(k.split(".")[1].split("x")[0]) for k in heads}
    # Encoder: 3 blocks at each of 32, 16, 8; decoder: in0 at 8 plus 4 blocks at each of 32, 16, 8.
    assert len(attended) == 3 * 3 + 1 + 3 * 4
    assert all(res_of[k] in (32, 16, 8) for k in attended)
    assert all(heads[k] == 0 for k in heads if res_of[k] == 64) and heads["dec.8x8_in1"] == 0
    for k, h in attended.items():
        block = adm_meta.enc[k[4:]] if k.startswith("enc") else adm_meta.dec[k[4:]]
        assert h == block.out_channels // 64
    assert heads["enc.32x32_block0"] == 192 * 2 // 64 and heads["dec.8x8_in0"] == 192 * 4 // 64


def test_init_laws():
    torch.manual_seed(0)
    net = build_network(load_cfg(**SMALL), 16, 3, label_dim=1000)
    # kaiming_uniform x sqrt(1/3) = PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
    conv = net.enc["16x16_conv"]
    bound = 1 / math.sqrt(3 * 3 * 3)
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert conv.bias.abs().max() <= bound and conv.bias.abs().max() > 0
    # The class embedding table starts ~ N(0, 1) (kaiming_normal x sqrt(label_dim)).
    assert net.map_label.bias is None
    assert net.map_label.weight.std().item() == pytest.approx(1.0, rel=0.05)
    # Zero-initialised: output conv, last conv of every residual branch and every attention projection.
    assert torch.all(net.out_conv.weight == 0) and torch.all(net.out_conv.bias == 0)
    for name, p in net.named_parameters():
        if name.endswith(("conv1.weight", "proj.weight")):
            assert torch.all(p == 0), name


def test_embedding_closed_form():
    torch.manual_seed(0)
    net = build_network(load_cfg(**SMALL), 16, 3, label_dim=5, augment_dim=2).eval()
    c = torch.tensor([-1.2, 0.0, 0.7])
    y = F.one_hot(torch.tensor([0, 3, 4]), 5).float()
    a = torch.randn(3, 2)
    half = 8  # model_channels / 2
    freqs = torch.tensor([10000.0 ** (-i / half) for i in range(half)])
    e = torch.cat([torch.cos(c[:, None] * freqs), torch.sin(c[:, None] * freqs)], dim=1) + a @ net.map_augment.weight.T
    h = F.silu(e @ net.map_layer0.weight.T + net.map_layer0.bias) @ net.map_layer1.weight.T + net.map_layer1.bias
    expected = F.silu(h + y @ net.map_label.weight.T)
    torch.testing.assert_close(net.embed(c, 3, y, a), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("res", [16, 32])
@pytest.mark.parametrize("label_dim,augment_dim", [(0, 0), (10, 9)])
def test_output_shape_and_zero_output_at_init(res, label_dim, augment_dim):
    torch.manual_seed(0)
    net = build_network(load_cfg(**SMALL), res, 3, label_dim=label_dim, augment_dim=augment_dim)
    x = torch.randn(2, 3, res, res)
    labels = F.one_hot(torch.tensor([1, 7]), 10).float() if label_dim else None
    aug = torch.randn(2, augment_dim) if augment_dim else None
    out = net(x, torch.randn(2), labels, aug)
    assert out.shape == x.shape
    assert torch.all(out == 0)  # zero-initialised output conv
    _perturb_zero_init(net)
    out = net(x, torch.randn(2), labels, aug)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() > 0


def test_class_conditioning_null_label_and_dropout():
    torch.manual_seed(0)
    net = build_network(load_cfg(**dict(SMALL, dropout=0.3)), 16, 1, label_dim=10)
    _perturb_zero_init(net)
    x = torch.randn(4, 1, 16, 16)
    sigma = torch.full((4,), 0.2)
    y0 = F.one_hot(torch.tensor([0, 1, 2, 3]), 10).float()
    y1 = F.one_hot(torch.tensor([5, 6, 7, 8]), 10).float()
    net.eval()
    with torch.no_grad():
        out0, out1, out_none = net(x, sigma, y0), net(x, sigma, y1), net(x, sigma, None)
        assert (out0 - out1).abs().max() > 1e-3 * out0.abs().max()
        torch.testing.assert_close(net(x, sigma, torch.zeros(4, 10)), out_none, rtol=0, atol=0)
        torch.testing.assert_close(net(x, sigma, y0), out0, rtol=0, atol=0)  # eval: deterministic
        net.train()  # dropout 0.3 makes two training-mode passes differ
        assert (net(x, sigma, y0) - net(x, sigma, y0)).abs().max() > 0
        for block in net.modules():
            if isinstance(block, UNetBlock):
                block.dropout = 0.0
        net.label_dropout = 1.0
        torch.testing.assert_close(net(x, sigma, y0), out_none)


def test_argument_errors():
    with pytest.raises(ValueError, match=r"attention at 16x16 needs at least channels_per_head=64"):
        DhariwalUNet(16, 3, 3, model_channels=16)
    with pytest.raises(ValueError, match=r"img_resolution=12 must be a multiple of .* = 8"):
        DhariwalUNet(12, 3, 3, **SMALL)
    net = DhariwalUNet(16, 1, 1, label_dim=10, **SMALL)
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.zeros(1, 3, 16, 16), torch.zeros(1))
    with pytest.raises(ValueError, match="class_labels must be one-hot"):
        net(torch.zeros(2, 1, 16, 16), torch.zeros(2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="model=adm: unknown parameter.*channels; valid parameters: .*model_channels"):
        build_network(load_cfg(channels=8), 16, 3)
