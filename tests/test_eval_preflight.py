"""The evaluation preflight: wrong weights, missing reference files and impossible settings fail at once, before any
sampling, in every mode of evaluate.py; and the weights identity (item 7 of issue 17) is the file's SHA-256 whichever
way the file was found.

Independent references: ``hashlib.sha256`` of the weights file computed here; counters on the sampling and
feature-extraction functions (they must never be reached); a randomly initialised Inception weights file built here.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from evaluation import protocol
from evaluation import run as run_module
from evaluation.features import (
    INCEPTION_WEIGHTS_URL,
    InceptionWeightsUnavailableError,
    extractor_weights,
    same_weights,
)
from evaluation.preflight import check_evaluation
from evaluation.reference_stats import save_reference_statistics
from evaluation.run import run_evaluation
from evaluation.settings import INCEPTION_EXTRACTOR, eval_settings
from tests.helpers import compose, write_random_inception_weights
from training import generate
from training.checkpoint import checkpoint_name, save_checkpoint
from training.denoiser import build_denoiser

FAST = 5.0  # seconds: the failures below take well under one on a 2-core CPU; a generous bound for a busy machine


def write_run(run_dir: Path, overrides: list[str] = (), nimg: int = 1234, step: int = 5) -> Path:
    """A run directory with one checkpoint of the tiny digits UNet (weights perturbed, so it is not a fresh model);
    returns the checkpoint file."""
    cfg = compose("train", ["model.model_channels=8", "model.num_blocks=1", *overrides])
    torch.manual_seed(123)
    den = build_denoiser(cfg, 8, 1)
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v.clone()
             for k, v in den.state_dict().items()}
    geometry = {"img_resolution": 8, "img_channels": 1, "label_dim": 0, "augment_dim": 0}
    return save_checkpoint(run_dir / "checkpoints" / checkpoint_name(nimg), {
        "config": OmegaConf.to_container(cfg, resolve=True), "geometry": geometry, "net": state, "ema": state,
        "progress": {"cur_nimg": nimg, "step": step, "skipped_steps": 0},
    })


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    write_run(run, ["sampler.num_steps=4"])
    return run


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth")


@pytest.fixture
def nothing_expensive(monkeypatch):
    """Sampling and feature extraction raise if reached; the calls are counted."""
    calls = []

    def refuse(name):
        def fn(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was reached: the preflight should have failed first")
        return fn

    monkeypatch.setattr(generate, "generate_images", refuse("generate_images"))
    monkeypatch.setattr(protocol, "generate_images", refuse("generate_images"))
    monkeypatch.setattr(run_module, "load_samples", refuse("load_samples"))
    monkeypatch.setattr(run_module, "compute_metrics", refuse("compute_metrics"))
    monkeypatch.setattr(run_module, "compute_reference_statistics", refuse("compute_reference_statistics"))
    monkeypatch.setattr(run_module, "run_curves", refuse("run_curves"))
    return calls


def _mode_args(mode: str, run: Path, tmp_path: Path) -> list[str]:
    if mode == "samples":
        npz = tmp_path / "samples.npz"
        np.savez(npz, samples=np.zeros((4, 8, 8, 1), np.uint8))
        return [f"samples={npz}"]
    return {"ckpt": [f"ckpt={run}"], "run_dir": [f"run_dir={run}"],
            "ref": ["ref=true", f"out={tmp_path / 'ref.npz'}"]}[mode]


def _fails_fast(args: list[str], error: type[BaseException], match: str) -> float:
    cfg = compose("evaluate", [*args, "device=cpu"])
    t0 = time.perf_counter()
    with pytest.raises(error, match=match):
        run_evaluation(cfg, args)
    return time.perf_counter() - t0


@pytest.mark.parametrize("mode", ["ckpt", "run_dir", "samples", "ref"])
def test_a_missing_weights_file_fails_at_once(mode, run_dir, tmp_path, nothing_expensive):
    args = [*_mode_args(mode, run_dir, tmp_path), "eval.feature_extractor=inception-v3-compat",
            "eval.feature_extractor_weights_path=/nonexistent/weights-inception.pth"]
    seconds = _fails_fast(args, FileNotFoundError, "eval.feature_extractor_weights_path=/nonexistent/weights-incep")
    assert seconds < FAST and nothing_expensive == []


@pytest.mark.parametrize("mode", ["ckpt", "run_dir", "samples"])
def test_a_missing_reference_file_fails_at_once(mode, run_dir, tmp_path, nothing_expensive):
    args = [*_mode_args(mode, run_dir, tmp_path), f"eval.reference_stats={tmp_path / 'missing.npz'}"]
    seconds = _fails_fast(args, FileNotFoundError, r"eval.reference_stats=.*missing.npz does not exist")
    assert seconds < FAST and nothing_expensive == []


def test_a_file_of_another_network_fails_before_sampling(run_dir, tmp_path, nothing_expensive):
    """A weights path that exists but holds something else (here: a small state dict) fails when the extractor is
    built, naming the file."""
    other = tmp_path / "not-inception.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, other)
    args = [f"ckpt={run_dir}", "eval.feature_extractor=inception-v3-compat",
            f"eval.feature_extractor_weights_path={other}"]
    seconds = _fails_fast(args, ValueError, "inception-v3-compat feature extractor could not be built from the "
                                            f"weights file {other}")
    assert seconds < FAST and nothing_expensive == []


def test_no_network_and_no_weights_fails_before_sampling(run_dir, tmp_path, monkeypatch, nothing_expensive):
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    def no_network(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fi, "load_state_dict_from_url", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights there
    args = [f"ckpt={run_dir}", "eval.feature_extractor=inception-v3-compat"]
    seconds = _fails_fast(args, InceptionWeightsUnavailableError, "eval.feature_extractor_weights_path=")
    assert seconds < FAST and nothing_expensive == []


@pytest.mark.parametrize("override,error,match", [
    ("eval.metrics=[fid,kid]", ValueError, "kid need"),
    ("eval.num_samples=1", ValueError, "at least 2 images"),
    ("eval.seed_repeats=0", ValueError, "eval.seed_repeats must be an integer >= 1"),
])
def test_impossible_settings_fail_before_sampling(override, error, match, run_dir, tmp_path, nothing_expensive):
    stats = save_reference_statistics(tmp_path / "ref.npz", {"mu": np.zeros(64), "sigma": np.eye(64)})
    _fails_fast([f"ckpt={run_dir}", override, f"eval.reference_stats={stats}"], error, match)
    assert nothing_expensive == []


def test_an_unwritable_output_fails_before_sampling(run_dir, tmp_path, nothing_expensive):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _fails_fast([f"ckpt={run_dir}", f"out={blocker}/sub/eval.json"], ValueError, "cannot write the result")
    assert nothing_expensive == []


# ---------------------------------------------------------------------------------------------------------------
# Item 7: one weights identity, whichever way the file was found
# ---------------------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_weights_id_is_the_file_digest_from_the_hub_or_a_path(inception_weights, tmp_path, monkeypatch):
    """The same file gives the same id from torch hub's cache and from eval.feature_extractor_weights_path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    hub = tmp_path / "torch-home" / "hub" / "checkpoints" / Path(INCEPTION_WEIGHTS_URL).name
    hub.parent.mkdir(parents=True)
    shutil.copy(inception_weights, hub)
    settings = eval_settings({})
    from_hub = extractor_weights(INCEPTION_EXTRACTOR, settings, None, None)
    from_path = extractor_weights(INCEPTION_EXTRACTOR, {**settings, "feature_extractor_weights_path":
                                                        str(inception_weights)}, None, None)
    expected = "inception-" + _sha256(inception_weights)[:12]
    assert from_hub == (str(hub), expected)
    assert from_path == (str(inception_weights), expected)


def test_same_weights_compares_the_shared_digits():
    assert same_weights("inception-6726825d", "inception-6726825d0af5")  # an old hub id, the new full id
    assert same_weights("inception-6726825d0af5", "inception-6726825d")
    assert not same_weights("inception-6726825e", "inception-6726825d0af5")
    assert not same_weights("inception-672682", "inception-6726825d0af5")  # fewer than 8 shared digits
    assert not same_weights("digits-classifier-6726825d0af5", "inception-6726825d0af5")


def _stats_file(path: Path, extractor_id: str | None, dim: int = 2048) -> Path:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((dim, 4))
    return save_reference_statistics(path, {"mu": rng.standard_normal(dim), "sigma": a @ a.T + np.eye(dim),
                                            "num_images": 100, "feature_extractor": INCEPTION_EXTRACTOR,
                                            "extractor_id": extractor_id or ""})


@pytest.mark.parametrize("digits", [12, 8])  # this version's id; an older id with the 8 digits of a hub file name
def test_reference_statistics_made_online_are_accepted_offline(digits, inception_weights, tmp_path):
    """Statistics recorded with the hub's weights (as an online ref=true writes them) pass the preflight of an
    offline evaluation given the same file by path; other weights are refused with what to do."""
    digest = _sha256(inception_weights)
    settings = eval_settings({"feature_extractor": INCEPTION_EXTRACTOR,
                              "feature_extractor_weights_path": str(inception_weights)})
    made_online = _stats_file(tmp_path / "online.npz", f"inception-{digest[:digits]}")
    found = check_evaluation({**settings, "reference_stats": str(made_online)}, None, chw=(1, 8, 8))
    assert found.extractor_id == f"inception-{digest[:12]}" and found.feature_dim == 2048
    assert found.published_weights is False  # random weights are not torch-fidelity's published file
    assert found.reference["stats"] == str(made_online)
    other = _stats_file(tmp_path / "other.npz", "inception-0123456789ab")
    with pytest.raises(ValueError, match=r"computed with the weights inception-0123456789ab.*sha256sum.*ref=true"):
        check_evaluation({**settings, "reference_stats": str(other)}, None, chw=(1, 8, 8))


def test_reference_statistics_of_another_feature_size_are_refused(inception_weights, tmp_path):
    settings = eval_settings({"feature_extractor": INCEPTION_EXTRACTOR,
                              "feature_extractor_weights_path": str(inception_weights)})
    small = _stats_file(tmp_path / "small.npz", None, dim=64)
    with pytest.raises(ValueError, match="64-d statistics but the inception-v3-compat features are 2048-d"):
        check_evaluation({**settings, "reference_stats": str(small)}, None, chw=(1, 8, 8))
