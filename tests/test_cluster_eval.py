"""Runs and evaluations that survive a cluster: data moved to node-local disk, sweeps with absolute paths, EDM's
ImageNet-64 preprocessing, curve keys without locations, and feature gathering over ranks.

Independent references: an uninterrupted training run (for the resume after a move); Hydra's own sweep directories;
EDM's center crop written out here with numpy slicing and PIL's LANCZOS; the likelihood computed directly with
``likelihood_metrics``; FID of one process against the gathered features of two.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from data import build_dataset
from data.prepare import main as prepare_main
from data.transforms import data_transform
from evaluation import reference_stats
from evaluation.curve_keys import curve_settings, legacy_curve_settings, settings_key
from evaluation.curves import read_curve
from evaluation.reference_stats import dataset_identity, save_reference_statistics
from evaluation.run import run_evaluation
from evaluation.settings import eval_settings
from tests.helpers import FAST_TRAIN, ROOT, compose, run_cli
from training.checkpoint import list_checkpoints, load_checkpoint
from training.trainer import train

SYNSETS = ["n01440764", "n02085620"]
SIZES = [(90, 70), (64, 101), (77, 77), (120, 45)]


def _photo(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A smooth random RGB image (a low-resolution noise field, upsampled), so that resampling filters matter."""
    small = rng.integers(0, 256, size=(max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory):
    """An ILSVRC-layout train folder: 2 synsets x 4 photos of assorted sizes, PNG (lossless)."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("ilsvrc") / "train"
    for s, synset in enumerate(SYNSETS):
        (root / synset).mkdir(parents=True)
        for k in range(4):
            w, h = SIZES[(s + k) % len(SIZES)]
            Image.fromarray(_photo(rng, w, h)).save(root / synset / f"{synset}_{k}.png")
    return root


def _edm_center_crop(path, r: int) -> np.ndarray:
    """EDM dataset_tool's center-crop from its definition: rows/cols [(n - c) // 2, (n + c) // 2) with c the short
    side, then PIL's LANCZOS to r x r; CHW."""
    img = np.asarray(Image.open(path).convert("RGB"))
    h, w = img.shape[:2]
    c = min(h, w)
    crop = img[(h - c) // 2:(h + c) // 2, (w - c) // 2:(w + c) // 2]
    return np.asarray(Image.fromarray(crop).resize((r, r), Image.LANCZOS)).transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------------------------------
# ImageNet-64 preprocessing: EDM's center crop by default, recorded, and checked against reference statistics
# ---------------------------------------------------------------------------------------------------------------------
def test_imagenet_default_is_edm_center_crop(ilsvrc, tmp_path):
    dest = tmp_path / "imagenet-8x8"
    assert prepare_main(["imagenet", "--source", str(ilsvrc), "--dest", str(dest), "--resolution", "8",
                         "--workers", "0"]) == 0
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "configs" / "data" / "imagenet64.yaml"),
                          {"path": str(dest), "resolution": 8})
    ds = build_dataset(cfg)
    files = sorted(p for p in ilsvrc.rglob("*.png"))
    assert len(ds) == len(files) == 8
    for i, path in enumerate(files):
        assert np.array_equal(ds[i][0].numpy(), _edm_center_crop(path, 8)), path.name
    assert data_transform(cfg) == "center-crop"
    # ADM's crop gives other pixels (what the reference-statistics check protects against)
    adm = tmp_path / "adm"
    assert prepare_main(["imagenet", "--source", str(ilsvrc), "--dest", str(adm), "--resolution", "8",
                         "--transform", "adm", "--workers", "0"]) == 0
    adm_ds = build_dataset(OmegaConf.merge(cfg, {"path": str(adm)}))
    assert data_transform(OmegaConf.merge(cfg, {"path": str(adm)})) == "adm"
    assert not torch.equal(adm_ds.all_images(), ds.all_images())


@pytest.fixture(scope="module")
def prepared(ilsvrc, tmp_path_factory):
    dest = tmp_path_factory.mktemp("data") / "imagenet-8x8"
    assert prepare_main(["imagenet", "--source", str(ilsvrc), "--dest", str(dest), "--resolution", "8",
                         "--workers", "0"]) == 0
    return dest


def _imagenet_train(run_dir, data_path, *overrides):
    cfg = compose("train", [f"run_dir={run_dir}", "data=imagenet64", f"data.path={data_path}", "data.resolution=8",
                            *FAST_TRAIN, "device=cpu", *overrides])
    train(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# Resuming after the dataset moved
# ---------------------------------------------------------------------------------------------------------------------
def test_resume_after_moving_the_dataset_is_exact(prepared, tmp_path):
    """Stop half-way, move the data (data.path and the prepare_cmd that embeds it change), resume: the final weights
    equal an uninterrupted run's."""
    here = tmp_path / "node-local" / "imagenet-8x8"
    shutil.copytree(prepared, tmp_path / "shared" / "imagenet-8x8")
    full, split = tmp_path / "full", tmp_path / "split"
    _imagenet_train(full, prepared)
    _imagenet_train(split, tmp_path / "shared" / "imagenet-8x8", "train.total_kimg=0.128")
    shutil.move(str(tmp_path / "shared" / "imagenet-8x8"), str(here))
    resumed = _imagenet_train(split, here, "resume=auto")
    saved = load_checkpoint(list_checkpoints(split)[0])["config"]["data"]
    assert str(tmp_path / "shared") in saved["prepare_cmd"] and str(here) in resumed.data.prepare_cmd
    a, b = load_checkpoint(full), load_checkpoint(split)
    assert a["progress"] == b["progress"] == {"cur_nimg": 256, "step": 8, "skipped_steps": 0}
    for key in ("net", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after the move and resume"


def test_resume_still_refuses_other_data(prepared, tmp_path):
    _imagenet_train(tmp_path, prepared, "train.total_kimg=0.128")
    with pytest.raises(ValueError, match=r"data.cond: True \(checkpoint\) != False \(now\)"):
        _imagenet_train(tmp_path, prepared, "resume=auto", "data.cond=false")


# ---------------------------------------------------------------------------------------------------------------------
# Sweeps: run names without paths; every run's likelihood in one command
# ---------------------------------------------------------------------------------------------------------------------
def test_sweep_run_names_leave_out_paths(tmp_path):
    images = tmp_path / "abs" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(images / f"{k}.png")
    sweep = tmp_path / "sweep"
    run_cli("train.py", "-m", "data=folder", f"data.path={images}", "data.resolution=8", "schedule=lognormal,cosine",
            "dry_run=true", f"hydra.sweep.dir={sweep}")
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == ["data.resolution=8,data=folder,schedule=cosine", "data.resolution=8,data=folder,schedule=lognormal"]
    assert not list(sweep.rglob("abs"))  # the path did not become sub-folders


NLL = ["eval.metrics=[nll]", "eval.nll_num_images=2", "eval.nll_tolerance=1e-2", "device=cpu"]


def test_sweep_likelihood_in_one_command(tmp_path):
    """run_dir=<sweep> eval=nll: each run's newest checkpoint -> <run>/eval-nll.json (as ckpt=<run> eval=nll), skipped
    when already there, read by the report as an extra column."""
    from evaluation.likelihood import likelihood_metrics
    from training.checkpoint import load_denoiser

    sweep = tmp_path / "sweep"
    for schedule in ("lognormal", "cosine"):
        train(compose("train", [f"run_dir='{sweep / ('schedule=' + schedule)}'", f"schedule={schedule}", *FAST_TRAIN,
                                "device=cpu"]))
    nll = ["eval=nll", "eval.nll_num_images=2", "eval.nll_tolerance=1e-2", "device=cpu"]
    out = run_evaluation(compose("evaluate", [f"run_dir={sweep}", *nll]), nll)
    assert sorted(out["runs"]) == ["schedule=cosine", "schedule=lognormal"] and out["skipped"] == []
    for name, record in out["runs"].items():
        newest = list_checkpoints(sweep / name)[-1]
        written = json.loads((sweep / name / "eval-nll.json").read_text())
        assert written["ckpt"] == str(newest) and written["settings_key"] == record["settings_key"]
        den, run_cfg = load_denoiser(newest)
        direct, _ = likelihood_metrics(den, run_cfg.data, {"nll_num_images": 2, "nll_tolerance": 1e-2},
                                       run_cfg.sampler, device="cpu")
        assert written["metrics"]["nll_ode_bpd"] == pytest.approx(direct["nll_ode_bpd"], rel=1e-6)
    mtimes = {p: p.stat().st_mtime_ns for p in sweep.glob("*/eval-nll.json")}
    again = run_evaluation(compose("evaluate", [f"run_dir={sweep}", *nll]), nll)
    assert again["runs"] == {} and sorted(again["skipped"]) == ["schedule=cosine", "schedule=lognormal"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # the report's extra column (the report itself needs curves: a likelihood curve of 2 images is the cheapest)
    run_evaluation(compose("evaluate", [f"run_dir={sweep}", *NLL]), NLL)
    report = run_evaluation(compose("evaluate", [f"report={sweep}"]), [])
    extras = report["tables"][0]["extras"]["nll_ode_bpd (eval-nll)"]
    assert set(extras) == {"lognormal", "cosine"}


def _legacy_settings(data_cfg, sampler_cfg, settings):
    """What version 1 of the curve code wrote as a point's settings (written out here from that code)."""
    from evaluation.reference_stats import legacy_reference_identity

    out = {k: settings[k] for k in ["metrics", "num_samples", "seed", "seed_repeats", "feature_extractor_weights_path"]}
    out.update({k: settings[k] for k in settings if k.startswith("nll_") and k != "nll_batch"})
    out["reference"] = legacy_reference_identity(data_cfg, "train")
    out["sampler"] = OmegaConf.to_container(sampler_cfg, resolve=True)
    out["ema"] = True
    return out


def test_curve_keys_hold_what_the_data_is_not_where(prepared, tmp_path):
    """A copy of the data elsewhere keeps the key (other content does not); points of a version-1 curve file,
    evaluated before the data moved, are re-keyed and not evaluated again."""
    data = OmegaConf.merge(OmegaConf.load(ROOT / "configs" / "data" / "imagenet64.yaml"),
                           {"path": str(prepared), "resolution": 8})
    sampler = OmegaConf.load(ROOT / "configs" / "sampler" / "heun.yaml")
    settings = eval_settings({"metrics": ["nll"], "nll_num_images": 2, "nll_tolerance": 1e-2, "nll_split": "train"})
    copy = tmp_path / "node-local" / "imagenet-8x8"
    shutil.copytree(prepared, copy)
    moved = OmegaConf.merge(data, {"path": str(copy)})
    key = settings_key(curve_settings(settings, data, sampler, True))
    assert settings_key(curve_settings(settings, moved, sampler, True)) == key
    assert dataset_identity(moved, "train") == dataset_identity(data, "train")
    # the cache name of the reference statistics too: a copy keeps them, other content does not
    ref_name = reference_stats.reference_identity(data, "train")
    assert reference_stats.reference_identity(moved, "train") == ref_name
    assert str(prepared) not in ref_name and "imagenet" in ref_name
    shard = np.load(copy / "images-00000.npy")
    shard[3, 0, 0, 0] ^= 1  # one bit of one item the fingerprint samples
    np.save(copy / "images-00000.npy", shard)
    reference_stats._IDENTITY_MEMO.clear()  # (memoised per config within a process)
    assert settings_key(curve_settings(settings, moved, sampler, True)) != key
    assert reference_stats.reference_identity(moved, "train") != ref_name

    run = tmp_path / "run"
    _imagenet_train(run, prepared)
    legacy = _legacy_settings(data, sampler, settings)
    ckpts = list_checkpoints(run)
    with open(run / "fid_curve.jsonl", "w") as f:
        for value, ckpt in zip((3.5, 3.25), ckpts):
            nimg = int(ckpt.stem.split("-")[1])
            f.write(json.dumps({"run": "run", "checkpoint": ckpt.name, "nimg": nimg, "kimg": nimg / 1000,
                                "settings_key": settings_key(legacy), "metrics": {"nll_ode_bpd": value},
                                "settings": legacy}) + "\n")
    shutil.move(str(prepared), str(tmp_path / "moved"))  # the data moves after the points were evaluated
    try:
        overrides = [f"run_dir={run}", f"data.path={tmp_path / 'moved'}", "eval.nll_split=train", *NLL]
        out = run_evaluation(compose("evaluate", overrides), overrides)
    finally:
        shutil.move(str(tmp_path / "moved"), str(prepared))
    entries = read_curve(run)
    assert [e["metrics"]["nll_ode_bpd"] for e in entries] == [3.5, 3.25]  # re-keyed, not evaluated again
    assert {e["rekeyed_from"] for e in entries} == {settings_key(legacy)}
    assert len({e["settings_key"] for e in entries}) == 1 and entries[0]["settings"]["key_version"] == 2
    assert out["runs"]["run"] == [(e["kimg"], e["metrics"]["nll_ode_bpd"]) for e in entries]
    assert legacy_curve_settings(settings, data, sampler, True) == legacy  # recognised by the exact old key too


def test_reference_statistics_of_another_crop_fail_before_sampling(prepared, tmp_path, monkeypatch):
    """ref=true records the data's --transform; evaluating data of another crop against the file is refused by the
    preflight, before any sampling (and a file of the same crop passes that check)."""
    import evaluation.protocol

    run = tmp_path / "run"
    _imagenet_train(run, prepared, "train.total_kimg=0.128")
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "num_images": 8, "feature_extractor": "inception-v3-compat"}

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the reference check")

    monkeypatch.setattr(evaluation.protocol, "generate_images", no_sampling)
    for transform in ("adm", "center-crop"):
        ref = save_reference_statistics(tmp_path / f"ref-{transform}.npz", {**stats, "transform": transform})
        overrides = [f"ckpt={run}", f"eval.reference_stats={ref}", "eval.feature_extractor=inception-v3-compat",
                     f"eval.feature_extractor_weights_path={tmp_path / 'missing.pth'}", "device=cpu"]
        if transform == "adm":
            with pytest.raises(ValueError, match=r"--transform adm, but this data .* --transform center-crop"):
                run_evaluation(compose("evaluate", overrides), overrides)
        else:  # passes the transform check; stops at the next one (the weights file)
            with pytest.raises(FileNotFoundError, match="missing.pth"):
                run_evaluation(compose("evaluate", overrides), overrides)


def test_reference_statistics_record_the_transform(prepared, tmp_path, monkeypatch):
    from evaluation.reference_stats import compute_reference_statistics, load_reference_statistics

    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "configs" / "data" / "imagenet64.yaml"),
                          {"path": str(prepared), "resolution": 8})
    monkeypatch.setattr(reference_stats, "extract_features", lambda images, **kw: torch.randn(len(images), 4))
    monkeypatch.setattr(reference_stats, "extractor_weights", lambda *args: (None, "inception-0123456789ab"))
    stats = compute_reference_statistics(build_dataset(cfg), feature_extractor="inception-v3-compat", data_cfg=cfg)
    assert stats["transform"] == "center-crop"
    loaded = load_reference_statistics(save_reference_statistics(tmp_path / "ref.npz", stats))
    assert loaded["transform"] == "center-crop" and loaded["num_images"] == 8
    images = build_dataset(cfg).all_images()  # an image tensor has no known preparation
    assert compute_reference_statistics(images, feature_extractor="inception-v3-compat")["transform"] is None


# ---------------------------------------------------------------------------------------------------------------------
# Features, not images, cross ranks
# ---------------------------------------------------------------------------------------------------------------------
GATHER_SCRIPT = r'''
import sys

import torch

from evaluation.dinov2 import EXTRACTOR_NAME
from evaluation.feature_metrics import image_features
from evaluation.ranks import gather_to_main, rank_slice
from evaluation.settings import eval_settings
from training.distributed import init_distributed, shutdown_distributed

weights, cache, out, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
info = init_distributed("cpu")
mine = list(rank_slice(n, info.rank, info.world_size))
images = torch.stack([torch.randint(0, 256, (3, 16, 16), generator=torch.Generator().manual_seed(i),
                                    dtype=torch.uint8) for i in mine])
settings = eval_settings({"dinov2_weights_path": weights, "batch": 4, "cache_dir": cache})
features = image_features(images, ["fd_dinov2"], EXTRACTOR_NAME, settings=settings, device="cpu").gather(True)
chunks = []  # the images themselves, streamed to rank 0 two at a time (2 x 768 bytes per message)
gather_to_main(images, True, sink=chunks.append, chunk_bytes=2 * 3 * 16 * 16)
only_rank0 = gather_to_main(images if info.rank == 0 else images[:0], True)  # a rank without rows
if info.rank == 0:
    torch.save({"features": features.features, "num_images": features.num_images, "chunks": chunks,
                "only_rank0": only_rank0, "rank0_rows": len(mine)}, out)
else:
    assert features is None
shutdown_distributed()
'''


def test_two_ranks_gather_features_whose_fd_equals_one_process(tmp_path):
    """torchrun, 2 gloo ranks, 13 images split 7 + 6: rank 0 receives the features (equal to one process's, so the
    FD is too) and, streamed in bounded chunks, the images in seed order."""
    from evaluation.dinov2 import EXTRACTOR_NAME, FEATURE_NAME
    from evaluation.feature_metrics import image_features
    from evaluation.frechet import fid_from_features
    from tests.test_dinov2 import _random_state

    weights = tmp_path / "dinov2.pth"
    torch.save(_random_state(dim=64, depth=1, seed=5), weights)
    script, out, n = tmp_path / "gather.py", tmp_path / "gathered.pt", 13
    script.write_text(GATHER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(weights), str(tmp_path / "cache"), str(out), str(n)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    images = torch.stack([torch.randint(0, 256, (3, 16, 16), generator=torch.Generator().manual_seed(i),
                                        dtype=torch.uint8) for i in range(n)])
    settings = eval_settings({"dinov2_weights_path": str(weights), "batch": 4, "cache_dir": str(tmp_path / "cache")})
    one = image_features(images, ["fd_dinov2"], EXTRACTOR_NAME, settings=settings, device="cpu")
    two = got["features"][EXTRACTOR_NAME][FEATURE_NAME]
    assert got["num_images"] == n and two.shape == (n, 64)
    assert torch.allclose(two, one.features[EXTRACTOR_NAME][FEATURE_NAME], atol=1e-5)
    reference = image_features(images.flip(-1), ["fd_dinov2"], EXTRACTOR_NAME, settings=settings, device="cpu")
    ref = reference.features[EXTRACTOR_NAME][FEATURE_NAME]
    assert fid_from_features(two, ref) == pytest.approx(fid_from_features(one.features[EXTRACTOR_NAME][FEATURE_NAME],
                                                                          ref), rel=1e-5)
    chunks = got["chunks"]
    assert max(len(c) for c in chunks) == 2 and torch.equal(torch.cat(chunks), images)
    assert torch.equal(got["only_rank0"], images[:got["rank0_rows"]])
