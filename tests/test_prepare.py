"""Tests of ``python -m data.prepare`` and the prepared format: CIFAR-10 round trip, ImageNet-style folders with ADM
preprocessing, EDM zips, resumption, atomicity, and the errors on corrupt / empty / missing data.

References are independent of the code under test: CIFAR pixels are unflattened in the test by explicit index
arithmetic, ADM's preprocessing is recomputed here step by step with PIL from its published definition, class indices
come from sorting the synset names here.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from data import InfiniteSampler, build_dataset
from data.image_source import ImageSource
from data.imagenet import imagenet_source
from data.prepare import main, prepare_images
from data.shards import META_FILE, STATE_FILE, read_meta

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------------------------------
def _unflatten_reference(rows: np.ndarray) -> np.ndarray:
    out = np.empty((rows.shape[0], 3, 32, 32), dtype=np.uint8)
    for c in range(3):
        for y in range(32):
            out[:, c, y, :] = rows[:, c * 1024 + y * 32 : c * 1024 + y * 32 + 32]
    return out


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory):
    """A CIFAR-10-layout archive: 5 train batches of 60 and a test batch of 40 random images."""
    rng = np.random.default_rng(0)
    members, data, labels = {}, [], []
    for name, n in [(f"data_batch_{i}", 60) for i in range(1, 6)] + [("test_batch", 40)]:
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, size=n).tolist()
        members[f"cifar-10-batches-py/{name}"] = pickle.dumps({b"data": rows, b"labels": lab, b"batch_label": b"x"})
        data.append(rows)
        labels.append(lab)
    path = tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    train = _unflatten_reference(np.concatenate(data[:5])), np.concatenate(labels[:5])
    test = _unflatten_reference(data[5]), np.array(labels[5])
    return path, train, test


def _cfg(name, **kw):
    return OmegaConf.merge(OmegaConf.load(CONFIGS / f"{name}.yaml"), kw)


def test_cifar10_prepare_round_trip_pixel_exact(cifar_archive, tmp_path):
    archive, (train_images, train_labels), (test_images, test_labels) = cifar_archive
    dest, dest_test = tmp_path / "cifar10-32x32", tmp_path / "cifar10-test"
    assert main(["cifar10", "--source", str(archive), "--dest", str(dest), "--shard-size", "128"]) == 0
    assert main(["cifar10", "--source", str(archive), "--dest", str(dest_test), "--split", "test"]) == 0
    meta = read_meta(dest)
    assert meta["num_images"] == 300 and meta["item_shape"] == [3, 32, 32] and len(meta["shards"]) == 3
    assert not (dest / STATE_FILE).exists() and not list(dest.glob("*.tmp-*"))

    ds = build_dataset(_cfg("cifar10", path=str(dest), test_path=str(dest_test), cond=True), "train")
    assert len(ds) == 300 and ds.label_dim == 10 and ds.resolution == 32 and not ds.latent
    assert np.array_equal(ds.all_images().numpy(), train_images)
    assert np.array_equal(ds.all_labels().numpy(), train_labels)
    for i in (0, 127, 128, 299):  # across shard boundaries
        image, label = ds[i]
        assert image.dtype == torch.uint8 and np.array_equal(image.numpy(), train_images[i])
        assert label == train_labels[i]
    test = build_dataset(_cfg("cifar10", path=str(dest), test_path=str(dest_test)), "test")
    assert np.array_equal(test.all_images().numpy(), test_images) and test[3][1] == -1
    with pytest.raises(ValueError, match=r"test split needs data.test_path"):
        build_dataset(_cfg("cifar10", path=str(dest)), "test")

    # through the training loop's DataLoader + data order (InfiniteSampler), with x-flip, after pickling to a worker
    flip = pickle.loads(pickle.dumps(build_dataset(_cfg("cifar10", path=str(dest), xflip=True, cond=True))))
    loader = torch.utils.data.DataLoader(flip, sampler=InfiniteSampler(600, seed=0, batch_size_per_rank=50),
                                         batch_size=50)
    images, labels = next(iter(loader))
    assert images.shape == (50, 3, 32, 32) and images.dtype == torch.uint8
    idx = [i for _, i in zip(range(50), iter(InfiniteSampler(600, seed=0, batch_size_per_rank=50)))]
    for k, i in enumerate(idx):
        expected = train_images[i % 300][:, :, ::-1] if i >= 300 else train_images[i]
        assert np.array_equal(images[k].numpy(), expected) and labels[k] == train_labels[i % 300]


def test_cifar10_prepare_as_edm_zip(cifar_archive, tmp_path):
    archive, (train_images, train_labels), _ = cifar_archive
    dest = tmp_path / "cifar10-32x32.zip"
    assert main(["cifar10", "--source", str(archive), "--dest", str(dest), "--format", "zip"]) == 0
    assert not list(tmp_path.glob("*.tmp-*"))
    ds = build_dataset(_cfg("folder", path=str(dest), resolution=32, cond=True))
    assert ds.names[:2] == ["00000/img00000000.png", "00000/img00000001.png"]
    assert np.array_equal(ds.all_images().numpy(), train_images)
    assert np.array_equal(ds.all_labels().numpy(), train_labels)


# ---------------------------------------------------------------------------------------------------------------------
# ImageNet-style folders
# ---------------------------------------------------------------------------------------------------------------------
SYNSETS = ["n02085620", "n01440764", "n04592741"]  # deliberately not in sorted order
SIZES = [(300, 200), (517, 389), (64, 97), (130, 131), (48, 40), (1000, 250)]  # (width, height), odd, small, wide


def _photo(rng, width, height):
    """A smooth-ish random RGB image (gradients + low-frequency noise), like a photo rather than white noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 256, size=(height // 8 + 2, width // 8 + 2, 3)).astype(np.float64)
    low = np.array(Image.fromarray(base.astype(np.uint8)).resize((width, height), Image.BILINEAR), dtype=np.float64)
    img = 0.6 * low + 0.4 * np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], -1)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    rng = np.random.default_rng(2)
    root = tmp_path_factory.mktemp("ilsvrc") / "train"
    files = []
    for s, synset in enumerate(SYNSETS):
        (root / synset).mkdir(parents=True)
        for k in range(4):
            w, h = SIZES[(s * 4 + k) % len(SIZES)]
            img = Image.fromarray(_photo(rng, w, h))
            if (s, k) == (1, 2):
                img = img.convert("L")  # a grayscale JPEG (ILSVRC has some)
            if (s, k) == (2, 1):
                img = img.convert("CMYK")  # and CMYK ones
            name = f"{synset}/{synset}_{k * 7 + 3}.JPEG"
            img.save(root / name, quality=90)
            files.append(name)
    return root, files


def adm_reference(path: Path, r: int) -> np.ndarray:
    """ADM's center_crop_arr, written out from its definition (Dhariwal & Nichol 2021, guided-diffusion)."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    while min(w, h) >= 2 * r:  # repeated 2x box downsampling
        w, h = w // 2, h // 2
        img = img.resize((w, h), Image.BOX)
    s = r / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
    left, top = (img.size[0] - r) // 2, (img.size[1] - r) // 2
    return np.array(img.crop((left, top, left + r, top + r))).transpose(2, 0, 1)


def test_adm_box_halving_is_the_2x2_mean():
    # The BOX stage on an even-sized image averages 2x2 blocks (checked with numpy, not PIL).
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    half = np.array(Image.fromarray(img).resize((30, 20), Image.BOX)).astype(np.int64)
    blocks = img.reshape(20, 2, 30, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(half - blocks).max() <= 1


@pytest.mark.parametrize("workers", [0, 2])
def test_imagenet_folder_to_64_matches_adm_reference(imagenet_dir, tmp_path, workers):
    root, files = imagenet_dir
    dest = tmp_path / "imagenet-64x64"
    assert main(["imagenet", "--source", str(root), "--dest", str(dest), "--resolution", "64", "--transform", "adm",
                 "--workers", str(workers), "--shard-size", "5"]) == 0
    ds = build_dataset(_cfg("imagenet64", path=str(dest)))
    assert len(ds) == 12 and ds.resolution == 64 and ds.label_dim == 3 and ds.num_classes == 3
    order = sorted(files)  # class-major in sorted synset order, then by file name
    classes = sorted(SYNSETS)
    assert ds.meta["class_names"] == classes
    for i, name in enumerate(order):
        image, label = ds[i]
        assert np.array_equal(image.numpy(), adm_reference(root / name, 64)), name
        assert label == classes.index(name.split("/")[0])


def test_folder_center_crops_at_other_resolutions_and_zip(imagenet_dir, tmp_path):
    root, files = imagenet_dir
    dest = tmp_path / "crops.zip"
    assert main(["folder", "--source", str(root), "--labels", "dirs", "--dest", str(dest), "--resolution", "32",
                 "--format", "zip", "--workers", "0"]) == 0
    ds = build_dataset(_cfg("folder", path=str(dest), resolution=32, cond=True))
    for i, name in enumerate(sorted(files)):
        assert np.array_equal(ds[i][0].numpy(), adm_reference(root / name, 32)), name
    assert ds.all_labels().tolist() == [sorted(SYNSETS).index(n.split("/")[0]) for n in sorted(files)]
    # EDM's center-crop transform: largest central square, one LANCZOS resize
    out = tmp_path / "edm-crop"
    assert main(["folder", "--source", str(root), "--dest", str(out), "--resolution", "24", "--transform",
                 "center-crop", "--workers", "0", "--max-images", "3"]) == 0
    ds = build_dataset(_cfg("folder", source="prepared", path=str(out), resolution=24))
    assert len(ds) == 3 and not ds.has_labels
    for i, name in enumerate(sorted(files)[:3]):
        img = Image.open(root / name).convert("RGB")
        c = min(img.size)
        left, top = (img.size[0] - c) // 2, (img.size[1] - c) // 2
        ref = np.array(img.crop((left, top, left + c, top + c)).resize((24, 24), Image.LANCZOS)).transpose(2, 0, 1)
        assert np.array_equal(ds[i][0].numpy(), ref)


def test_corrupt_image_error_nothing_half_written_and_resume(imagenet_dir, tmp_path):
    root, files = imagenet_dir
    bad_root = tmp_path / "train"
    for name in files:
        (bad_root / name).parent.mkdir(parents=True, exist_ok=True)
        (bad_root / name).write_bytes((root / name).read_bytes())
    victim = sorted(files)[9]  # in the third shard of 4 images
    blob = (root / victim).read_bytes()
    (bad_root / victim).write_bytes(blob[: len(blob) // 3])  # truncated JPEG
    dest = tmp_path / "out"
    args = ["imagenet", "--source", str(bad_root), "--dest", str(dest), "--resolution", "16", "--shard-size", "4",
            "--transform", "adm", "--workers", "0"]
    with pytest.raises(ValueError, match=rf"cannot read image '{victim}' in '.*train': OSError: (?i:.*truncated)"):
        prepare_images(imagenet_source(bad_root), dest, resolution=16,
                       shard_size=4, source_type="imagenet", command="python -m data.prepare " + " ".join(args))
    # finished shards stay; no temporary or partial file; no metadata, so loaders refuse it with the resume command
    assert sorted(p.name for p in dest.iterdir()) == [STATE_FILE, "images-00000.npy", "images-00001.npy"]
    with pytest.raises(FileNotFoundError, match=r"unfinished preparation; rerun its command to resume:\n.*prepare"):
        build_dataset(_cfg("imagenet64", path=str(dest), resolution=16))
    assert main(args) == 1  # the CLI reports the same error and exits 1
    inodes = {p.name: p.stat().st_ino for p in dest.glob("images-*.npy")}

    (bad_root / victim).write_bytes(blob)  # fixed: re-running resumes
    assert main(args) == 0
    assert {p.name: p.stat().st_ino for p in dest.glob("images-0000[01].npy")} == inodes  # not rewritten
    assert sorted(p.name for p in dest.iterdir()) == [
        "images-00000.npy", "images-00001.npy", "images-00002.npy", "labels.npy", META_FILE]
    ds = build_dataset(_cfg("imagenet64", path=str(dest), resolution=16))
    for i, name in enumerate(sorted(files)):
        assert np.array_equal(ds[i][0].numpy(), adm_reference(root / name, 16))
    assert main(args) == 0  # complete: nothing to do
    # other settings into the same directory are refused rather than mixed
    assert main([*args[:-4], "--shard-size", "3", "--workers", "0"]) == 1
    with pytest.raises(ValueError, match=r"already holds a prepared dataset made with other settings.*shard_size"):
        prepare_images(imagenet_source(bad_root), dest, resolution=16,
                       shard_size=3)


def test_empty_and_unsuitable_sources(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("no images")
    dest = tmp_path / "out"
    with pytest.raises(ValueError, match=r"no images found in '.*empty'"):
        prepare_images(ImageSource(empty), dest, resolution=8)
    assert main(["imagenet", "--source", str(empty), "--dest", str(dest), "--workers", "0"]) == 1
    assert not dest.exists()
    (empty / "a.png").write_bytes(b"not a png at all")
    assert main(["folder", "--source", str(empty), "--dest", str(dest), "--resolution", "8", "--workers", "0"]) == 1
    assert not any(dest.glob("images-*"))
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "x.png")
    with pytest.raises(ValueError, match=r"--labels dirs needs every image inside a class sub-folder"):
        ImageSource(loose, labels="dirs")
    (loose / "cats").mkdir()
    Image.new("RGB", (8, 8)).save(loose / "cats" / "y.png")
    (loose / "x.png").unlink()
    with pytest.raises(ValueError, match=r"does not look like the ILSVRC train folder.*\['cats'\]"):
        imagenet_source(loose)
    notempty = tmp_path / "notempty"
    notempty.mkdir()
    (notempty / "keep.txt").write_text("x")
    assert main(["folder", "--source", str(loose), "--dest", str(notempty), "--resolution", "8", "--workers", "0"]) == 1
    assert sorted(p.name for p in notempty.iterdir()) == ["keep.txt"]


def test_missing_dataset_names_the_prepare_command(tmp_path):
    for name, fragment in [("imagenet64", "python -m data.prepare imagenet --source <ILSVRC2012>/train --dest "),
                           ("imagenet256_latent", "python -m data.prepare latents --source <ILSVRC2012>/train "),
                           ("imagenet512_latent", "--resolution 512 --vae stabilityai/sd-vae-ft-ema --flip")]:
        missing = tmp_path / name
        with pytest.raises(FileNotFoundError, match="dataset not found") as info:
            build_dataset(_cfg(name, path=str(missing)))
        assert fragment in str(info.value) and f"--dest {missing}" in str(info.value)


def test_data_configs_compose():
    from tests.helpers import compose

    for name, shape in [("cifar10", (3, 32)), ("imagenet64", (3, 64)), ("imagenet256_latent", (4, 32)),
                        ("imagenet512_latent", (4, 64)), ("folder", (3, 32))]:
        cfg = compose("train", [f"data={name}"])
        assert cfg.data.name == name and (cfg.data.channels, cfg.data.resolution) == shape
        assert 0 <= cfg.data.augment <= 1
        if "prepare_cmd" in cfg.data:
            assert f"--dest {cfg.data.path}" in cfg.data.prepare_cmd
    assert json.loads(json.dumps(OmegaConf.to_container(compose("train", ["data=cifar10"]).data)))["augment"] == 0.12
