"""Every model config (configs/model/*.yaml) composes, builds through models.build_network, is wrapped by the EDM
preconditioner the same way, and -- at reduced width -- memorises a batch of 8 digits: the EDM-weighted denoising
loss on a fixed (image, noise, sigma) batch falls at least 10x within a few hundred Adam steps, on CPU in seconds.

The reference is the loss at step 0 (a fresh network; with zero-initialised output layers D = c_skip x); a network
that ignores its input or whose gradients do not reach the weights cannot memorise the per-sample targets.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from configs.model_sizes import canonical_model_config
from data.digits import DigitsDataset
from diffusion.preconditioning import EDMPrecond
from models import ARCHITECTURES, build_network

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml"))

# Reduced widths/depths per architecture (the configs' structure -- levels, attention, patching, head count -- is
# kept; DiT sizes keep their head count at 8 channels per head, depth 2).
REDUCED = {
    "songunet": lambda cfg: dict(model_channels=8, num_blocks=1, dropout=0.0),
    "dhariwalunet": lambda cfg: dict(model_channels=8, channels_per_head=8, num_blocks=1, dropout=0.0),
    "dit": lambda cfg: dict(depth=2, hidden_size=8 * canonical_model_config(cfg)["num_heads"]),
    "edm2unet": lambda cfg: dict(model_channels=8, channels_per_head=8, num_blocks=1, dropout=0.0),
}


def _resolution(cfg) -> int:
    """16 for every network except patch-8 DiTs (32, so that they still see 16 tokens)."""
    return 32 if cfg.arch == "dit" and cfg.patch_size >= 8 else 16


def test_every_config_has_a_known_arch_and_a_reduction():
    assert {"unet_tiny", "ddpmpp", "ncsnpp", "adm", "dit_s2", "dit_xl8"} <= set(MODEL_CONFIGS)
    for name in MODEL_CONFIGS:
        cfg = OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")
        assert cfg.name == name, f"configs/model/{name}.yaml has name '{cfg.name}'"
        assert cfg.arch in ARCHITECTURES and cfg.arch in REDUCED


@pytest.mark.parametrize("name", ["adm", "dit_b2", "dit_xl8", "ddpmpp"])
def test_model_option_composes_with_train_config(name):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="train", overrides=[f"model={name}"])
    assert cfg.model.name == name
    with torch.device("meta"):
        net = build_network(cfg.model, 32, 4, label_dim=1000)
    assert type(net) is ARCHITECTURES[cfg.model.arch]


@pytest.fixture(scope="module")
def digits():
    out = {}
    for res in (16, 32):
        ds = DigitsDataset(resolution=res, cond=True)
        images = torch.stack([torch.as_tensor(ds[i][0]) for i in range(8)]).float() / 127.5 - 1
        labels = torch.as_tensor([int(ds[i][1]) for i in range(8)])
        out[res] = images, F.one_hot(labels, 10).float()
    return out


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_reduced_network_memorises_a_batch_of_digits(name, digits):
    cfg = OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")
    for key, value in REDUCED[cfg.arch](cfg).items():
        cfg[key] = value
    res = _resolution(cfg)
    y, labels = digits[res]
    torch.manual_seed(0)
    net = build_network(cfg, res, 1, label_dim=10)
    denoiser = EDMPrecond(net, sigma_data=0.5)
    gen = torch.Generator().manual_seed(1)
    sigma = torch.exp(torch.linspace(-1.5, 0.5, 8))  # 0.22 .. 1.65
    x = y + sigma[:, None, None, None] * torch.randn(y.shape, generator=gen)
    weight = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2)[:, None, None, None]  # EDM's lambda(sigma)
    opt = torch.optim.Adam(denoiser.parameters(), lr=3e-3)
    losses = []
    for _ in range(400):
        loss = (weight * (denoiser(x, sigma, labels) - y).square()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 10:
            break
    assert losses[-1] < losses[0] / 10, f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps"
