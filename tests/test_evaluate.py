"""Tests of evaluate.py (metrics through torch-fidelity, CLI) and evaluation/digits_classifier.py.

Independent references: the Fréchet distance recomputed here with numpy + ``scipy.linalg.sqrtm`` from features taken
directly from the registered extractor; exact identities (FID(x, x) = 0, 1 <= IS <= number of classes); the
held-out accuracy recomputed by argmax; a randomly initialised Inception weights file built here (no download).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.linalg
import torch
from omegaconf import OmegaConf

from data import build_dataset
from evaluation import digits_classifier as dc
from evaluation.features import INCEPTION_WEIGHTS_URL, InceptionWeightsUnavailableError, UInt8Images
from evaluation.frechet import feature_statistics, fid_from_features, frechet_distance
from evaluation.metrics import compute_metrics, load_samples
from evaluation.reference_stats import (
    compute_reference_statistics,
    load_reference_statistics,
    reference_identity,
    save_reference_statistics,
)
from evaluation.run import run_evaluation
from tests.helpers import write_random_inception_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_cfg():
    return OmegaConf.load(ROOT / "configs" / "data" / "digits.yaml")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture(scope="module")
def splits(digits_cfg):
    return build_dataset(digits_cfg, "train"), build_dataset(digits_cfg, "test")


@pytest.fixture(scope="module")
def classifier(digits_cfg, cache_dir):
    path, meta = dc.load_or_train_digits_classifier(digits_cfg, cache_dir)
    return path, meta


def _features(path: str, images: torch.Tensor) -> np.ndarray:
    """Penultimate features through the extractor class torch-fidelity has registered (float64 numpy)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    cls = FEATURE_EXTRACTORS_REGISTRY["digits-classifier"]
    extractor = cls("digits-classifier", [dc.FEATURE_NAME], feature_extractor_weights_path=path).eval()
    with torch.no_grad():
        (feats,) = extractor(images)
    return feats.double().numpy()


def _frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# ---------------------------------------------------------------------------------------------------------------
# Digits classifier
# ---------------------------------------------------------------------------------------------------------------
def test_classifier_heldout_accuracy_and_cache(classifier, splits, digits_cfg, cache_dir):
    path, meta = classifier
    train, heldout = splits
    model, loaded_meta = dc.load_digits_classifier(path)
    with torch.no_grad():
        pred = model(heldout.all_images()).argmax(1)
    accuracy = (pred == heldout.all_labels()).double().mean().item()
    assert accuracy >= 0.95, accuracy
    assert meta["heldout_accuracy"] == pytest.approx(accuracy)
    assert loaded_meta["num_heldout"] == len(heldout.all_labels()) and loaded_meta["num_train"] == len(train)
    # Cached: a second request returns the same file without retraining (mtime unchanged).
    mtime = os.stat(path).st_mtime_ns
    assert dc.load_or_train_digits_classifier(digits_cfg, cache_dir)[0] == path
    assert os.stat(path).st_mtime_ns == mtime
    # The key names the data variant: binarized digits get another file.
    binary = OmegaConf.merge(digits_cfg, {"name": "binary_digits", "binarize": True})
    assert dc.classifier_cache_path(binary, cache_dir) != path
    # Upsampled digits (16x16 nearest-neighbour) are area-downsampled back: identical logits.
    x = heldout.all_images()[:20]
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.repeat_interleave(2, 2).repeat_interleave(2, 3)), atol=1e-5)


def test_registration_is_idempotent():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    dc.register_digits_classifier()
    dc.register_digits_classifier()
    assert FEATURE_EXTRACTORS_REGISTRY["digits-classifier"] is dc.DigitsClassifierFeatures


# ---------------------------------------------------------------------------------------------------------------
# FID on digits-classifier features
# ---------------------------------------------------------------------------------------------------------------
def test_fid_matches_independent_frechet_distance(classifier, splits):
    path, _ = classifier
    train, heldout = splits
    g = torch.Generator().manual_seed(0)
    a = heldout.all_images()
    b = train.all_images()[:600]
    noisy = (a.float() + 40 * torch.randn(a.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    for x, y in ((a, b), (noisy, b)):
        ours = compute_metrics(x, y, feature_extractor="digits-classifier", classifier_path=path)
        expected = _frechet(_features(path, x), _features(path, y))
        # torch-fidelity keeps the feature means in float32 and takes the trace of the square root from eigenvalues;
        # both differ from this float64 sqrtm computation only by rounding.
        assert ours["fid_digits_classifier"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert expected > 10  # the noisy pair is a non-trivial case


def test_fid_identity_and_ordering(classifier, splits, digits_cfg):
    path, _ = classifier
    train, heldout = splits
    x = train.all_images()
    same = compute_metrics(x, x.clone(), feature_extractor="digits-classifier", classifier_path=path)
    assert abs(same["fid_digits_classifier"]) < 1e-6
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(0, 256, heldout.all_images().shape, generator=g, dtype=torch.uint8)
    # auto + data_cfg picks the digits classifier; the reference can be the ImageDataset itself.
    held = compute_metrics(heldout.all_images(), train, data_cfg=digits_cfg, classifier_path=path)
    rand = compute_metrics(noise, train, data_cfg=digits_cfg, classifier_path=path)
    assert held["fid_digits_classifier"] > 0
    assert rand["fid_digits_classifier"] > 20 * held["fid_digits_classifier"], (held, rand)


def test_all_metrics_keys_and_ranges(classifier, splits):
    path, _ = classifier
    train, heldout = splits
    g = torch.Generator().manual_seed(2)
    noise = torch.randint(0, 256, (300, 1, 8, 8), generator=g, dtype=torch.uint8)
    kw = dict(metrics=["fid", "isc", "kid", "prc"], feature_extractor="digits-classifier", classifier_path=path)
    held = compute_metrics(heldout.all_images(), train, **kw)
    rand = compute_metrics(noise, train, **kw)
    tag = "digits_classifier"
    expected_keys = {f"fid_{tag}", f"isc_{tag}_mean", f"isc_{tag}_std", f"kid_{tag}_mean", f"kid_{tag}_std",
                     f"prc_{tag}_precision", f"prc_{tag}_recall", f"prc_{tag}_f_score"}
    assert set(held) == expected_keys
    # IS = exp(E KL(p(y|x) || p(y))) lies in [1, number of classes]; real digits come close to 10, noise does not.
    assert 1.0 <= rand[f"isc_{tag}_mean"] < held[f"isc_{tag}_mean"] <= 10.0
    assert held[f"isc_{tag}_mean"] > 7
    assert rand[f"kid_{tag}_mean"] > held[f"kid_{tag}_mean"] + 10 * held[f"kid_{tag}_std"]
    # k-NN precision/recall: noise covers almost none of the digits manifold (recall); its precision stays high-ish
    # (noise features sit near the centre, inside the large k-NN balls of ambiguous real digits), but below real's.
    assert 0.8 < held[f"prc_{tag}_precision"] <= 1.0 and 0.8 < held[f"prc_{tag}_recall"] <= 1.0
    assert rand[f"prc_{tag}_recall"] < 0.2 and rand[f"prc_{tag}_precision"] < held[f"prc_{tag}_precision"]


def test_reference_statistics_cache(classifier, splits, digits_cfg, tmp_path, monkeypatch):
    path, _ = classifier
    train, heldout = splits
    seen = []
    forward = dc.DigitsClassifierFeatures.forward

    def counting_forward(self, x):
        seen.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(dc.DigitsClassifierFeatures, "forward", counting_forward)
    name = reference_identity(digits_cfg, "train")
    kw = dict(feature_extractor="digits-classifier", classifier_path=path, reference_cache_name=name,
              eval_cfg={"cache_dir": str(tmp_path), "batch": 500})
    gen = heldout.all_images()
    first = compute_metrics(gen, train, **kw)
    assert sum(seen) == len(gen) + len(train)
    stats = list((tmp_path / "fidelity").glob("*stat-fid*"))
    assert len(stats) == 1
    fname = stats[0].name
    assert "train" in fname and "digits-classifier" in fname and f"n{len(train)}" in fname and "bin0" in fname
    mtime = stats[0].stat().st_mtime_ns
    seen.clear()
    second = compute_metrics(gen, train, **kw)
    assert sum(seen) == len(gen)  # only the generated images went through the classifier
    assert stats[0].stat().st_mtime_ns == mtime
    assert second == first
    # A different reference size is a different cache entry, never the stale one.
    seen.clear()
    compute_metrics(gen, train.all_images()[:1000], **kw)
    assert sum(seen) == len(gen) + 1000
    assert len(list((tmp_path / "fidelity").glob("*stat-fid*"))) == 2


def test_reference_identity_separates_variants(digits_cfg):
    base = reference_identity(digits_cfg, "train")
    variants = [
        reference_identity(digits_cfg, "test"),
        reference_identity(OmegaConf.merge(digits_cfg, {"binarize": True}), "train"),
        reference_identity(OmegaConf.merge(digits_cfg, {"split_seed": 1}), "train"),
        reference_identity(OmegaConf.merge(digits_cfg, {"resolution": 16}), "train"),
        reference_identity(OmegaConf.merge(digits_cfg, {"heldout_fraction": 0.2}), "train"),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    assert os.sep not in base


def test_input_errors(classifier, splits, tmp_path):
    path, _ = classifier
    train, heldout = splits
    x = heldout.all_images()
    kw = dict(feature_extractor="digits-classifier", classifier_path=path)
    with pytest.raises(ValueError, match="unknown metric 'fd'.*fid, isc, kid, prc"):
        compute_metrics(x, train, metrics=["fd"], **kw)
    with pytest.raises(ValueError, match="unknown eval.feature_extractor 'vgg'.*inception-v3-compat"):
        compute_metrics(x, train, feature_extractor="vgg", classifier_path=path)
    rgb16 = torch.zeros(10, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\(3, 16, 16\).*\(1, 8, 8\)"):
        compute_metrics(rgb16, train, **kw)
    with pytest.raises(ValueError, match="auto needs the dataset"):
        compute_metrics(x, x)
    # load_samples: NHWC and NCHW give the same tensor; wrong shapes and missing keys/paths are named.
    np.savez(tmp_path / "nhwc.npz", samples=x.permute(0, 2, 3, 1).numpy())
    np.savez(tmp_path / "nchw.npz", samples=x.numpy())
    np.savez(tmp_path / "nokey.npz", images=x.numpy())
    assert torch.equal(load_samples(tmp_path / "nhwc.npz", (1, 8, 8)), x)
    assert torch.equal(load_samples(tmp_path / "nchw.npz", (1, 8, 8)), x)
    with pytest.raises(ValueError, match=r"\(269, 1, 8, 8\).*\(3, 32, 32\)"):
        load_samples(tmp_path / "nchw.npz", (3, 32, 32))
    with pytest.raises(ValueError, match="no array 'samples'.*images"):
        load_samples(tmp_path / "nokey.npz")
    with pytest.raises(FileNotFoundError, match="samples path not found"):
        load_samples(tmp_path / "missing.npz")


def test_png_folder_samples(tmp_path, splits):
    from PIL import Image

    _, heldout = splits
    x = heldout.all_images()[:12]
    for i, img in enumerate(x):
        Image.fromarray(img[0].numpy()).save(tmp_path / f"{i:06d}.png")
    assert torch.equal(load_samples(tmp_path, (1, 8, 8)), x)


# ---------------------------------------------------------------------------------------------------------------
# Inception path (random weights built here; never downloads)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    return str(write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth"))


def test_inception_with_weights_file(random_inception_weights, tmp_path):
    g = torch.Generator().manual_seed(3)
    # Inception runs at only a few images/s on these CPUs: 12 images a side (3 passes of 12 in all).
    a = torch.randint(0, 256, (12, 3, 32, 32), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (12, 3, 32, 32), generator=g, dtype=torch.uint8)
    ev = {"cache_dir": str(tmp_path), "feature_extractor_weights_path": random_inception_weights, "batch": 12}
    kw = dict(feature_extractor="inception-v3-compat", eval_cfg=ev, reference_cache_name="random-a")
    ab = compute_metrics(b, a, **kw)
    aa = compute_metrics(a, a, **kw)  # reference statistics of a come from the cache here
    assert set(ab) == {"fid_inception"}
    assert abs(aa["fid_inception"]) < 1e-4
    assert ab["fid_inception"] > 1e-3
    # The cache name carries the weights' digest: other weights can never reuse these statistics.
    (stats,) = (tmp_path / "fidelity").glob("*stat-fid*")
    assert dc.file_digest(random_inception_weights) in stats.name


def test_grayscale_is_repeated_for_inception():
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    item = UInt8Images(x, to_rgb=True)[2]
    assert item.shape == (3, 8, 8) and all(torch.equal(item[c], x[2, 0]) for c in range(3))


def test_offline_inception_error_is_clear_and_fast(monkeypatch, tmp_path):
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    def no_network(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fi, "load_state_dict_from_url", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights file there
    x = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    t0 = time.time()
    with pytest.raises(InceptionWeightsUnavailableError) as info:
        compute_metrics(x, x, feature_extractor="inception-v3-compat", eval_cfg={"cache_dir": str(tmp_path)})
    assert time.time() - t0 < 20
    message = str(info.value)
    assert INCEPTION_WEIGHTS_URL in message
    assert "weights-inception-2015-12-05-6726825d.pth" in message
    assert "eval.feature_extractor_weights_path=" in message
    # A weights path that does not exist is named, too.
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compute_metrics(x, x, feature_extractor="inception-v3-compat",
                        eval_cfg={"cache_dir": str(tmp_path), "feature_extractor_weights_path": "/nope.pth"})


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


def test_cli_samples_npz(tmp_path, splits, classifier, digits_cfg):
    path, _ = classifier
    train, heldout = splits
    samples = heldout.all_images()
    npz = tmp_path / "samples.npz"
    np.savez(npz, samples=samples.permute(0, 2, 3, 1).numpy())  # NHWC, as sample.py writes
    cache = Path(path).parents[1]  # the directory holding digits_classifier/: reuse the trained classifier
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "evaluate.py", f"samples={npz}", "data=digits", f"eval.cache_dir={cache}", "device=cpu",
         "eval.baselines=true"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "classifier-FID" in proc.stdout and "digits-classifier features" in proc.stdout
    out = tmp_path / "eval-default-samples.json"
    record = json.loads(out.read_text())
    expected = compute_metrics(samples, train, data_cfg=digits_cfg, classifier_path=path)
    assert record["metrics"]["fid_digits_classifier"] == pytest.approx(expected["fid_digits_classifier"], rel=1e-9)
    assert record["feature_extractor"] == "digits-classifier"
    # The samples are the held-out split itself: they score exactly the floor.
    assert record["columns"]["floor"]["fid_digits_classifier"] == pytest.approx(
        record["metrics"]["fid_digits_classifier"], rel=1e-9)
    assert f"{record['metrics']['fid_digits_classifier']:.4f}" in proc.stdout


def test_cli_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of samples"):
        run_evaluation(_compose(["device=cpu"]))
    with pytest.raises(ValueError, match="exactly one of samples"):
        run_evaluation(_compose([f"samples={tmp_path}/a.npz", f"ckpt={tmp_path}", "device=cpu"]))
    with pytest.raises(FileNotFoundError, match="samples path not found"):
        run_evaluation(_compose([f"samples={tmp_path}/missing.npz", "device=cpu"]))
    with pytest.raises(ValueError, match="unknown metric 'fdi'"):
        run_evaluation(_compose([f"samples={tmp_path}/missing.npz", "eval.metrics=[fdi]", "device=cpu"]))


def test_cli_checkpoint_with_baselines(tmp_path, classifier):
    """ckpt=<run dir>: samples generated on the fly; floor and ceiling reported; the run's data config is used."""
    from hydra import compose, initialize_config_dir

    from training.checkpoint import checkpoint_name, save_checkpoint
    from training.denoiser import build_denoiser

    path, _ = classifier
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        run_cfg = compose(config_name="train", overrides=["eval=default", "data=digits", "model=unet_tiny"])
    # The "trained" weights: every float tensor perturbed (SongUNet zero-initialises its output layer, so two fresh
    # initialisations would sample identical images).
    torch.manual_seed(123)
    den = build_denoiser(run_cfg, 8, 1)
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v.clone()
             for k, v in den.state_dict().items()}
    den.load_state_dict(state)
    geometry = {"img_resolution": 8, "img_channels": 1, "label_dim": 0, "augment_dim": 0}
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "checkpoints" / checkpoint_name(0), {
        "config": OmegaConf.to_container(run_cfg, resolve=True), "geometry": geometry, "net": state, "ema": state,
    })
    cache = str(Path(path).parents[1])
    cfg = _compose([f"ckpt={run_dir}", "device=cpu", "eval.num_samples=30", "eval.batch=30", "eval.baselines=true",
                    "sampler.num_steps=3", f"eval.cache_dir={cache}"])
    record = run_evaluation(cfg, ["sampler.num_steps=3"])
    assert record["num_samples"] == 30 and record["seeds"] == [0, 29]
    assert record["sampler"]["num_steps"] == 3
    cols = record["columns"]
    assert set(cols) == {"samples", "floor", "ceiling"}  # 30 samples < 269 held-out: no matched-size column
    # Recompute both columns here: the checkpoint's network, and a fresh one initialised with seed eval.seed = 0,
    # each sampled from seeds 0..29 with the run's Heun sampler cut to 3 steps.
    from training.generate import generate_images

    sampler = OmegaConf.merge(run_cfg.sampler, {"num_steps": 3})
    train = build_dataset(run_cfg.data, "train")
    kw = dict(data_cfg=run_cfg.data, classifier_path=path)
    den.eval()
    expected_samples = compute_metrics(
        generate_images(den, range(30), sampler_cfg=sampler, batch_size=30, device="cpu"), train, **kw)
    torch.manual_seed(0)
    fresh = build_denoiser(run_cfg, 8, 1).eval()
    expected_ceiling = compute_metrics(
        generate_images(fresh, range(30), sampler_cfg=sampler, batch_size=30, device="cpu"), train, **kw)
    key = "fid_digits_classifier"
    assert cols["samples"][key] == pytest.approx(expected_samples[key], rel=1e-6)
    assert cols["ceiling"][key] == pytest.approx(expected_ceiling[key], rel=1e-6)
    assert cols["samples"][key] != pytest.approx(cols["ceiling"][key], rel=1e-3)
    assert cols["ceiling"][key] > 10 * cols["floor"][key]
    assert (run_dir / "eval-default.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance of feature sets against the closed form; published / computed reference statistics
# ---------------------------------------------------------------------------------------------------------------
def _features_with_moments(mu: np.ndarray, sigma: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n feature vectors whose sample mean is exactly mu and unbiased sample covariance exactly sigma."""
    z = np.random.default_rng(seed).standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance I exactly
    return mu + z @ np.linalg.cholesky(sigma).T


def test_fid_of_gaussian_feature_sets_matches_the_closed_form():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    # Commuting covariances (shared eigenbasis Q): FID = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    f = 6
    q, _ = np.linalg.qr(rng.standard_normal((f, f)))
    a, b = rng.uniform(0.2, 3.0, f), rng.uniform(0.2, 3.0, f)
    mu1, mu2 = rng.standard_normal(f), rng.standard_normal(f)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    x1, x2 = _features_with_moments(mu1, s1, 500, 1), _features_with_moments(mu2, s2, 300, 2)
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert fid_from_features(x1, x2) == pytest.approx(closed, rel=1e-9)
    assert fid_from_features(torch.from_numpy(x1), torch.from_numpy(x1)) == pytest.approx(0, abs=1e-9)
    # Non-commuting 2x2 covariances: tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2))) (eigenvalues l1, l2 >= 0:
    # sqrt(l1) + sqrt(l2) = sqrt(l1 + l2 + 2 sqrt(l1 l2))).
    s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    m = s1 @ s2
    closed = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                   - 2 * np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m))))
    x1, x2 = _features_with_moments(mu1, s1, 200, 3), _features_with_moments(mu2, s2, 100, 4)
    assert fid_from_features(x1, x2) == pytest.approx(closed, rel=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-12)
    # torch-fidelity's routine (eigenvalues of S1 S2) on the same statistics agrees.
    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert tf["frechet_inception_distance"] == pytest.approx(closed, rel=1e-9)
    with pytest.raises(ValueError, match="equal F"):
        frechet_distance(mu1, s1, np.zeros(3), np.eye(3))


def test_reference_statistics_files(classifier, splits, digits_cfg, tmp_path):
    """EDM-format (mu, sigma), ADM-format (+ arr_0) and images-only files give the FID of the reference images."""
    path, _ = classifier
    train, heldout = splits
    kw = dict(feature_extractor="digits-classifier", classifier_path=path)
    direct = compute_metrics(heldout.all_images(), train, **kw)["fid_digits_classifier"]
    stats = compute_reference_statistics(train, **kw)
    assert stats["num_images"] == len(train.all_images()) and stats["mu"].shape == (64,)
    mine = save_reference_statistics(tmp_path / "ref.npz", stats)
    np.savez(tmp_path / "edm.npz", mu=stats["mu"], sigma=stats["sigma"])
    np.savez(tmp_path / "adm.npz", arr_0=train.all_images().permute(0, 2, 3, 1).numpy(), mu=stats["mu"],
             sigma=stats["sigma"])
    np.savez(tmp_path / "images.npz", arr_0=train.all_images().permute(0, 2, 3, 1).numpy())
    for name in (mine, tmp_path / "edm.npz", tmp_path / "adm.npz", tmp_path / "images.npz"):
        value = compute_metrics(heldout.all_images(), None, reference_stats=str(name), **kw)
        # torch-fidelity's own statistics are float32-mean / eigvals: equal up to rounding.
        assert value["fid_digits_classifier"] == pytest.approx(direct, rel=1e-4), name
    # The option through eval_cfg, with IS alongside; KID/PRC refused; a foreign extractor's file refused.
    both = compute_metrics(heldout.all_images(), None, metrics=["fid", "isc"],
                           eval_cfg={"reference_stats": str(mine)}, **kw)
    assert set(both) == {"fid_digits_classifier", "isc_digits_classifier_mean", "isc_digits_classifier_std"}
    with pytest.raises(ValueError, match="only the reference mu and Sigma; kid need"):
        compute_metrics(heldout.all_images(), None, metrics=["fid", "kid"], reference_stats=str(mine), **kw)
    save_reference_statistics(tmp_path / "foreign.npz", {**stats, "feature_extractor": "inception-v3-compat"})
    with pytest.raises(ValueError, match="computed with inception-v3-compat features"):
        compute_metrics(heldout.all_images(), None, reference_stats=str(tmp_path / "foreign.npz"), **kw)
    np.savez(tmp_path / "wide.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="2048-d statistics but the digits-classifier features are 64-d"):
        compute_metrics(heldout.all_images(), None, reference_stats=str(tmp_path / "wide.npz"), **kw)
    np.savez(tmp_path / "bad.npz", means=np.zeros(3))
    with pytest.raises(ValueError, match="neither mu/sigma.*found: means"):
        load_reference_statistics(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="cifar10-32x32.npz"):
        load_reference_statistics(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="nll is a property of the model"):
        compute_metrics(heldout.all_images(), train, metrics=["nll"], **kw)


def test_cli_ref_writes_edm_format(classifier, splits, tmp_path):
    path, _ = classifier
    train, _ = splits
    cache = Path(path).parents[1]
    out = tmp_path / "digits-8x8.npz"
    result = run_evaluation(_compose(["ref=true", "data=digits", f"eval.cache_dir={cache}", f"out={out}",
                                      "device=cpu"]))
    with np.load(out) as npz:
        mu, sigma = npz["mu"], npz["sigma"]
        assert mu.dtype == np.float64 and sigma.shape == (64, 64) and int(npz["num_images"]) == len(train)
    expected = feature_statistics(_features(path, train.all_images()))
    assert np.allclose(mu, expected[0], atol=1e-5) and np.allclose(sigma, expected[1], atol=1e-5)
    assert result["feature_extractor"] == "digits-classifier"
