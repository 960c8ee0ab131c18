"""Every config option composes and builds; unknown options fail with the valid choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import CONFIG_DIR, compose

GROUPS = ["model", "data", "precond", "schedule", "weighting", "sampler", "eval", "logger"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_builds(group, option):
    cfg = compose("train", [f"{group}={option}"])
    assert cfg[group].name, f"{group}/{option}.yaml has no name"
    if group == "schedule":
        from diffusion.schedules import build_schedule
        from diffusion.weighting import build_weighting

        weighting = build_weighting(cfg.weighting, img_resolution=32, sigma_data=0.5)
        schedule = build_schedule(cfg.schedule, weighting=weighting, img_resolution=32, sigma_data=0.5,
                                  total_nimg=1000, batch_size=64)
        sigma = schedule.sample(1000, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(sigma).all() and (sigma > 0).all()
    elif group == "weighting":
        from diffusion.schedules import build_schedule
        from diffusion.weighting import build_weighting
        from training.denoiser import build_uncertainty

        # A learned weighting (edm2_uncertainty) gets its u(σ) module from the trainer; the others take none.
        weighting = build_weighting(cfg.weighting, img_resolution=32, sigma_data=0.5,
                                    uncertainty=build_uncertainty(cfg))
        weighting.attach_schedule(build_schedule(cfg.schedule))
        w = weighting(torch.tensor([0.002, 1.0, 80.0]))
        assert torch.isfinite(w).all() and (w > 0).all()
    elif group == "precond":
        from training.denoiser import build_denoiser

        denoiser = build_denoiser(cfg, img_resolution=8, img_channels=1)
        out = denoiser(torch.randn(2, 1, 8, 8), torch.tensor([0.01, 10.0]))
        assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    elif group == "sampler":
        from diffusion.samplers import sampler_options
        from diffusion.sigma_grids import build_sigma_grid

        if not str(cfg.sampler.get("steps_from", "rho")).startswith("infonoise"):
            sigmas = build_sigma_grid(cfg.sampler, schedule_context={"img_resolution": 32})
            assert sigmas[-1] == 0 and (sigmas[:-1].diff() < 0).all()
        sampler_options(cfg.sampler)
    elif group == "model":
        from models import build_network, count_parameters

        with torch.device("meta"):
            net = build_network(cfg.model, img_resolution=32, img_channels=4 if "dit" in option else 3,
                                label_dim=10)
        assert count_parameters(net) > 0


@pytest.mark.parametrize("group", GROUPS)
def test_unknown_option_lists_valid_choices(group):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as info:
        compose("train", [f"{group}=no_such_option"])
    message = str(info.value)
    assert "no_such_option" in message
    for option in _options(group)[:3]:
        assert option in message


def test_experiment_presets_compose():
    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        cfg = compose("train", [f"experiment={path.stem}"])
        assert cfg.train.batch > 0, path


def test_defaults_are_the_cpu_demo():
    cfg = compose("train", [])
    assert (cfg.model.name, cfg.data.name, cfg.schedule.name, cfg.precond.name, cfg.sampler.name) == (
        "unet_tiny", "digits", "lognormal", "edm", "heun")
    assert Path(CONFIG_DIR / "train.yaml").read_text().count("optional experiment") == 1


def test_dit_configs_written_before_sizes_were_named_still_match():
    """Checkpoints of DiT runs store the model config they were made with; before the model configs named a size
    (``size: B``) they spelled out depth / hidden_size / num_heads. Both spellings build the same network, and resuming
    such a run with today's ``model=dit_b2`` finds no difference in the model config."""
    from omegaconf import OmegaConf

    from configs.validation import config_differences
    from models import build_network, count_parameters

    now = OmegaConf.to_container(compose("train", ["model=dit_b2"]), resolve=True)
    saved = OmegaConf.to_container(compose("train", ["model=dit_b2"]), resolve=True)
    del saved["model"]["size"]
    saved["model"].update(depth=12, hidden_size=768, num_heads=12)  # the old configs/model/dit_b2.yaml
    assert config_differences(saved, now) == []
    with torch.device("meta"):
        old_net = build_network(saved["model"], 32, 4, label_dim=1000)
        new_net = build_network(now["model"], 32, 4, label_dim=1000)
    assert count_parameters(old_net) == count_parameters(new_net) == 130_315_808
    assert [(k, v.shape) for k, v in old_net.state_dict().items()] == [
        (k, v.shape) for k, v in new_net.state_dict().items()]
    # a different network is still a difference, and an override of a size's value is honoured
    bigger = OmegaConf.to_container(compose("train", ["model=dit_l2"]), resolve=True)
    assert any(d.startswith("model.depth") for d in config_differences(saved, bigger))
    deeper = OmegaConf.to_container(compose("train", ["model=dit_b2", "model.depth=6"]), resolve=True)
    assert config_differences(saved, deeper) == ["model.depth: 12 (checkpoint) != 6 (now)"]
