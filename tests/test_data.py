"""Tests of data/: digits split and pixel mapping, CIFAR-10 archive reading, image folders / EDM zips, pixel encoding.

Every source is checked against data the test builds itself (sklearn's raw arrays mapped independently, a
CIFAR-format archive written here, PNGs written here with PIL), never against outputs of the code under test.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import load_digits

from data import SOURCES, ImageDataset, build_dataset, to_model_space, to_uint8

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


def digits_cfg(**overrides):
    cfg = OmegaConf.load(CONFIGS / "digits.yaml")
    return OmegaConf.merge(cfg, overrides)


@pytest.fixture(scope="module")
def raw_digits():
    bunch = load_digits()
    return bunch.images, bunch.target


# ---------------------------------------------------------------------------------------------------------------------
# registry / pixel encoding
# ---------------------------------------------------------------------------------------------------------------------
def test_registry_and_unknown_source():
    assert set(SOURCES) == {"digits", "cifar10", "folder", "prepared"}
    with pytest.raises(ValueError,
                       match=r"unknown data.source 'mnist'; valid choices: cifar10, digits, folder, prepared"):
        build_dataset({"name": "x", "source": "mnist"})
    with pytest.raises(ValueError, match=r"unknown split 'val'.*train, test"):
        build_dataset(digits_cfg(), split="val")


def test_model_space_round_trip_all_256_values():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_model_space(u)
    assert x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    # independent formula: x = 2u/255 - 1
    np.testing.assert_allclose(x.numpy().ravel(), 2 * np.arange(256) / 255 - 1, atol=1e-6)
    assert torch.equal(to_uint8(x), u)
    # clipping beyond [-1, 1] and float passthrough
    assert to_uint8(torch.tensor([-3.0, 5.0])).tolist() == [0, 255]
    latent = torch.randn(2, 4, dtype=torch.float64)
    assert torch.equal(to_model_space(latent), latent.float())
    with pytest.raises(TypeError):
        to_model_space(torch.zeros(2, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------------------------------
def test_digits_split_is_fixed_disjoint_stratified(raw_digits):
    _, target = raw_digits
    train, test = build_dataset(digits_cfg(), "train"), build_dataset(digits_cfg(), "test")
    tr, te = set(train.indices.tolist()), set(test.indices.tolist())
    assert len(train) + len(test) == 1797 == len(target)
    assert not tr & te and tr | te == set(range(1797))
    for c in range(10):
        count = int((target == c).sum())
        in_test = int((target[sorted(te)] == c).sum())
        assert abs(in_test - 0.15 * count) <= 1, (c, in_test, count)
    # same parameters -> same split; another seed -> another split
    assert torch.equal(build_dataset(digits_cfg(), "test").indices, test.indices)
    assert not torch.equal(build_dataset(digits_cfg(split_seed=1), "test").indices, test.indices)
    # labels come along with the images
    assert torch.equal(test.all_labels(), torch.as_tensor(target[sorted(te)]))


def test_digits_pixel_mapping_exact(raw_digits):
    images, target = raw_digits
    ds = build_dataset(digits_cfg(cond=True), "train")
    idx = ds.indices.numpy()
    expected = np.array([[[round(v * 255 / 16 + 1e-9) for v in row] for row in img] for img in images[idx]])
    got = ds.all_images()
    assert got.dtype == torch.uint8 and got.shape == (len(idx), 1, 8, 8)
    assert np.array_equal(got[:, 0].numpy(), expected)
    assert ds.label_dim == 10 and ds.has_labels and not ds.binary
    img, label = ds[5]
    assert torch.equal(img, got[5]) and label == target[idx[5]]
    # unconditional: labels are -1 but the source still has labels
    unc = build_dataset(digits_cfg(), "train")
    assert unc.label_dim == 0 and unc.has_labels and unc[5][1] == -1


def test_binary_digits_threshold(raw_digits):
    images, _ = raw_digits
    cfg = digits_cfg(name="binary_digits", binarize=True)
    ds = build_dataset(cfg, "test")
    got = ds.all_images()[:, 0].numpy()
    assert ds.binary and set(np.unique(got).tolist()) == {0, 255}
    assert np.array_equal(got, (images[ds.indices.numpy()] >= 8) * 255)
    x = to_model_space(ds.all_images())
    assert set(torch.unique(x).tolist()) == {-1.0, 1.0}


def test_binary_digits_yaml_composes():
    base = OmegaConf.load(CONFIGS / "digits.yaml")
    child = OmegaConf.load(CONFIGS / "binary_digits.yaml")
    child.pop("defaults")
    ds = build_dataset(OmegaConf.merge(base, child), "train")
    assert ds.name == "binary_digits" and ds.binary


def test_digits_upsampling_and_bad_config(raw_digits):
    small = build_dataset(digits_cfg(), "test").all_images()
    big = build_dataset(digits_cfg(resolution=32), "test").all_images()
    assert big.shape[-2:] == (32, 32)
    # nearest neighbour: pixel (y, x) of the 32x32 image is pixel (y // 4, x // 4) of the 8x8 one
    ys = torch.arange(32) // 4
    assert torch.equal(big, small[:, :, ys][:, :, :, ys])
    with pytest.raises(ValueError, match=r"data.resolution=12.*multiple"):
        build_dataset(digits_cfg(resolution=12))
    with pytest.raises(ValueError, match=r"data.channels=3.*channels=1"):
        build_dataset(digits_cfg(channels=3))
    with pytest.raises(ValueError, match=r"heldout_fraction"):
        build_dataset(digits_cfg(heldout_fraction=1.5))


def test_xflip_doubles_with_mirrored_copies():
    ds = build_dataset(digits_cfg(xflip=True, cond=True), "test")
    n = ds.num_images
    assert len(ds) == 2 * n
    for i in (0, 7, n - 1):
        img, label = ds[i]
        flipped, flabel = ds[n + i]
        assert torch.equal(flipped, img[:, :, torch.arange(img.shape[-1] - 1, -1, -1)]) and flabel == label
    assert ds.all_images().shape[0] == n
    with pytest.raises(IndexError):
        ds[2 * n]


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------------------------------
def _batch_pickle(rng, n, protocol=4):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    payload = {b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": [b"f"] * n}
    return pickle.dumps(payload, protocol=protocol), data, labels


def _write_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def _unflatten_reference(rows: np.ndarray) -> np.ndarray:
    """[N, 3072] -> [N, 3, 32, 32] by explicit index arithmetic: pixel (c, y, x) is column c*1024 + y*32 + x."""
    out = np.empty((rows.shape[0], 3, 32, 32), dtype=np.uint8)
    for c in range(3):
        for y in range(32):
            out[:, c, y, :] = rows[:, c * 1024 + y * 32 : c * 1024 + y * 32 + 32]
    return out


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory):
    rng = np.random.default_rng(0)
    members, train_data, train_labels = {}, [], []
    for i in range(1, 6):
        blob, data, labels = _batch_pickle(rng, 20, protocol=2 if i == 3 else 4 + (i % 2))  # protocols 2, 4, 5
        if i == 3:  # name the array constructor as numpy 1.x did (the official archive's pickles do)
            blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            assert b"numpy.core.multiarray\n_reconstruct" in blob
        members[f"cifar-10-batches-py/data_batch_{i}"] = blob
        train_data.append(data)
        train_labels += labels
    blob, test_data, test_labels = _batch_pickle(rng, 20)
    members["cifar-10-batches-py/test_batch"] = blob
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [b"a"] * 10})
    path = tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz"
    # write members in shuffled order: the reader must put data_batch_1..5 in order regardless
    order = list(members)
    rng.shuffle(order)
    _write_tar(path, {k: members[k] for k in order})
    return path, members, np.concatenate(train_data), np.array(train_labels), test_data, np.array(test_labels)


def _cifar_cfg(path, **kw):
    cfg = OmegaConf.load(CONFIGS / "cifar10.yaml")
    return OmegaConf.merge(cfg, {"path": str(path), **kw})


def test_cifar10_archive_pixel_exact(cifar_archive):
    path, _, train_data, train_labels, test_data, test_labels = cifar_archive
    train = build_dataset(_cifar_cfg(path, cond=True), "train")
    assert len(train) == 100 and train.label_dim == 10 and train.num_channels == 3 and train.resolution == 32
    assert np.array_equal(train.all_images().numpy(), _unflatten_reference(train_data))
    assert np.array_equal(train.all_labels().numpy(), train_labels)
    img, label = train[42]
    assert np.array_equal(img.numpy(), _unflatten_reference(train_data[42:43])[0]) and label == train_labels[42]
    test = build_dataset(_cifar_cfg(path), "test")
    assert np.array_equal(test.all_images().numpy(), _unflatten_reference(test_data))
    assert np.array_equal(test.all_labels().numpy(), test_labels) and test[0][1] == -1


def test_cifar10_extracted_directory(cifar_archive, tmp_path):
    _, members, train_data, _, _, _ = cifar_archive
    for name, blob in members.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(blob)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        ds = build_dataset(_cifar_cfg(root), "train")
        assert np.array_equal(ds.all_images().numpy(), _unflatten_reference(train_data))


def test_cifar10_errors(cifar_archive, tmp_path):
    path, members, *_ = cifar_archive
    with pytest.raises(FileNotFoundError, match=r"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz.*data.path"):
        build_dataset(_cifar_cfg(tmp_path / "nope.tar.gz"))
    not_tar = tmp_path / "fake.tar.gz"
    not_tar.write_bytes(b"this is not an archive" * 10)
    with pytest.raises(ValueError, match=r"fake.tar.gz.*not a readable tar"):
        build_dataset(_cifar_cfg(not_tar))
    partial = tmp_path / "partial.tar.gz"
    _write_tar(partial, {k: v for k, v in members.items() if not k.endswith("data_batch_4")})
    with pytest.raises(ValueError, match=r"partial.tar.gz.*lacks member.*data_batch_4"):
        build_dataset(_cifar_cfg(partial))
    assert len(build_dataset(_cifar_cfg(partial), "test")) == 20  # the test split doesn't need it
    bad_shape = tmp_path / "shape.tar.gz"
    wrong = dict(members)
    wrong["cifar-10-batches-py/test_batch"] = pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4})
    _write_tar(bad_shape, wrong)
    with pytest.raises(ValueError, match=r"shape.tar.gz.*test_batch.*uint8 array \[N, 3072\]"):
        build_dataset(_cifar_cfg(bad_shape), "test")
    with pytest.raises(ValueError, match=r"data.resolution=64.*resolution=32"):
        build_dataset(_cifar_cfg(path, resolution=64))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar10_refuses_forbidden_globals(cifar_archive, tmp_path):
    _, members, *_ = cifar_archive
    marker = tmp_path / "pwned"
    evil = dict(members)
    evil["cifar-10-batches-py/test_batch"] = pickle.dumps({b"data": _Evil(marker), b"labels": [0]})
    path = tmp_path / "evil.tar.gz"
    _write_tar(path, evil)
    with pytest.raises(ValueError, match=r"evil.tar.gz.*test_batch.*refusing to load global '(posix|os|nt)\.system'"):
        build_dataset(_cifar_cfg(path), "test")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# image folder / EDM zip
# ---------------------------------------------------------------------------------------------------------------------
def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder_images():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(7, 16, 16, 3), dtype=np.uint8)  # HWC, as written to disk
    names = [f"{i // 4:05d}/img{i:08d}.png" for i in range(7)]  # EDM naming, two sub-folders
    labels = [int(v) for v in rng.integers(0, 5, size=7)]
    return names, images, labels


def _write_folder(root: Path, names, images, labels=None):
    for name, img in zip(names, images):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_png_bytes(img))
    if labels is not False:
        meta = {"labels": None if labels is None else [[n, lab] for n, lab in zip(names, labels)]}
        (root / "dataset.json").write_text(json.dumps(meta))


def _folder_cfg(path, **kw):
    cfg = OmegaConf.load(CONFIGS / "folder.yaml")
    return OmegaConf.merge(cfg, {"path": str(path), "resolution": 16, **kw})


def test_folder_directory_pixel_exact_with_labels(folder_images, tmp_path):
    names, images, labels = folder_images
    _write_folder(tmp_path, names, images, labels)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = build_dataset(_folder_cfg(tmp_path, cond=True), "train")
    assert isinstance(ds, ImageDataset) and len(ds) == 7 and ds.names == names
    assert np.array_equal(ds.all_images().numpy(), images.transpose(0, 3, 1, 2))
    assert ds.all_labels().tolist() == labels and ds.label_dim == max(labels) + 1
    assert [ds[i][1] for i in range(7)] == labels


def test_folder_without_labels_and_grayscale(folder_images, tmp_path):
    names, images, _ = folder_images
    _write_folder(tmp_path, names, images, labels=False)
    ds = build_dataset(_folder_cfg(tmp_path), "train")
    assert not ds.has_labels and ds.all_labels().tolist() == [-1] * 7 and ds[3][1] == -1
    with pytest.raises(ValueError, match=r"data.cond=true.*no class labels"):
        build_dataset(_folder_cfg(tmp_path, cond=True))
    gray = build_dataset(_folder_cfg(tmp_path, channels=1), "train").all_images()
    # ITU-R 601-2 luma as PIL documents it: L = R*299/1000 + G*587/1000 + B*114/1000 (rounded)
    rgb = images.astype(np.int64)
    luma = (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114 + 500) // 1000
    assert gray.shape == (7, 1, 16, 16)
    assert np.abs(gray[:, 0].numpy().astype(np.int64) - luma).max() <= 1


def test_folder_null_labels_json(folder_images, tmp_path):
    names, images, _ = folder_images
    _write_folder(tmp_path, names, images, labels=None)
    assert not build_dataset(_folder_cfg(tmp_path)).has_labels


def test_edm_zip_pixel_exact_lazy_and_picklable(folder_images, tmp_path):
    names, images, labels = folder_images
    path = tmp_path / "dataset.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, img in zip(reversed(names), images[::-1]):  # written out of order: reader sorts
            zf.writestr(name, _png_bytes(img))
        zf.writestr("dataset.json", json.dumps({"labels": [[n, lab] for n, lab in zip(names, labels)]}))
    ds = build_dataset(_folder_cfg(path, cond=True, xflip=True), "train")
    assert len(ds) == 14 and ds.names == names
    assert np.array_equal(ds.all_images().numpy(), images.transpose(0, 3, 1, 2))
    assert ds.all_labels().tolist() == labels
    img, label = ds[7 + 2]
    assert np.array_equal(img.numpy(), images[2, :, ::-1].transpose(2, 0, 1)) and label == labels[2]
    clone = pickle.loads(pickle.dumps(ds))  # after the zip was opened: handles are dropped, re-opened lazily
    assert torch.equal(clone[4][0], ds[4][0])


def test_folder_errors(folder_images, tmp_path):
    names, images, labels = folder_images
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images found in '.*empty'"):
        build_dataset(_folder_cfg(empty))
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        build_dataset(_folder_cfg(tmp_path / "missing_dir"))
    with pytest.raises(ValueError, match="data.path is not set"):
        build_dataset(OmegaConf.load(CONFIGS / "folder.yaml"))
    with pytest.raises(ValueError, match=r"no test split.*data.test_path"):
        build_dataset(_folder_cfg(empty), "test")

    good = tmp_path / "good"
    _write_folder(good, names, images, labels)
    with pytest.raises(ValueError, match=r"data.resolution=32.*img00000000.png.*resolution=16"):
        build_dataset(_folder_cfg(good, resolution=32))
    # a later image of the wrong size fails when read, naming the file
    Image.fromarray(images[0, :8, :8]).save(good / names[5])
    ds = build_dataset(_folder_cfg(good))
    with pytest.raises(ValueError, match=r"img00000005.png.*8x8.*expected 16x16"):
        ds[5]
    # truncated PNG: error names the file, PIL's error is chained
    blob = _png_bytes(images[6])
    (good / names[6]).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"cannot read image '00001/img00000006.png'") as info:
        ds[6]
    assert info.value.__cause__ is not None
    # a labels file missing an image
    (good / "dataset.json").write_text(json.dumps({"labels": [[n, 0] for n in names[1:]]}))
    with pytest.raises(ValueError, match=r"no label for image '00000/img00000000.png'"):
        build_dataset(_folder_cfg(good))


def test_folder_test_split_from_test_path(folder_images, tmp_path):
    names, images, labels = folder_images
    _write_folder(tmp_path / "tr", names[:3], images[:3], labels[:3])
    _write_folder(tmp_path / "te", names[3:], images[3:], labels[3:])
    test = build_dataset(_folder_cfg(tmp_path / "tr", test_path=str(tmp_path / "te")), "test")
    assert np.array_equal(test.all_images().numpy(), images[3:].transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------------------------------
# prepared (memory-mapped shard) format
# ---------------------------------------------------------------------------------------------------------------------
def _write_prepared(dest, images, labels=None, shard_size=4, settings=None):
    from data.shards import ShardedWriter

    writer = ShardedWriter(dest, num_items=len(images), item_shape=images.shape[1:], dtype=images.dtype,
                           shard_size=shard_size, settings=settings or {"test": 1}, command="make it")
    for k in writer.pending_shards():
        start, stop = writer.shard_range(k)
        writer.write_shard(k, images[start:stop])
    return writer.finalize({"kind": "pixels", "num_classes": None if labels is None else int(max(labels)) + 1},
                           labels)


def test_prepared_dataset_reads_shards_exactly_and_in_workers(tmp_path):
    from data.shards import open_npy

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(10, 3, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 4, size=10)
    meta = _write_prepared(tmp_path / "ds", images, labels)
    assert meta["shards"] == ["images-00000.npy", "images-00001.npy", "images-00002.npy"]
    assert np.array_equal(np.load(tmp_path / "ds" / "images-00001.npy"), images[4:8])  # plain .npy files
    assert np.array_equal(open_npy(tmp_path / "ds" / "images-00002.npy"), images[8:])
    cfg = {"name": "p", "source": "prepared", "path": str(tmp_path / "ds"), "cond": True, "xflip": True}
    ds = build_dataset(cfg)
    assert len(ds) == 20 and ds.label_dim == int(labels.max()) + 1 and ds[-1][0].shape == (3, 8, 8)
    assert np.array_equal(ds.all_images().numpy(), images) and ds.all_labels().tolist() == labels.tolist()
    for i in range(20):
        image, label = ds[i]
        expected = images[i % 10][:, :, ::-1] if i >= 10 else images[i]
        assert np.array_equal(image.numpy(), expected) and label == labels[i % 10]
        image[:] = 0  # items are copies: writing one does not touch the (read-only) map
    assert np.array_equal(ds.all_images().numpy(), images)
    with pytest.raises(IndexError):
        ds[20]
    with pytest.raises(ValueError, match=r"data.resolution=16 but the prepared dataset .* has resolution=8"):
        build_dataset({**cfg, "resolution": 16})
    # DataLoader workers (forked, each mapping the shards itself) deliver the same batches as the main process
    batches = [
        [b[0] for b in torch.utils.data.DataLoader(ds, batch_size=5, num_workers=w)] for w in (0, 2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*batches)) and len(batches[1]) == 4


def test_shard_writes_are_atomic_and_checked(tmp_path, monkeypatch):
    from data import shards
    from data.shards import ShardedWriter, open_npy

    images = np.arange(6 * 4, dtype=np.uint8).reshape(6, 1, 2, 2)
    writer = ShardedWriter(tmp_path / "d", num_items=6, item_shape=(1, 2, 2), dtype=np.uint8, shard_size=4,
                           settings={"a": 1})
    with pytest.raises(ValueError, match=r"shard 1: expected uint8 \(2, 1, 2, 2\)"):
        writer.write_shard(1, images[:3])

    def fail_midway(f, array, **kwargs):
        f.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(shards.np.lib.format, "write_array", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        writer.write_shard(0, images[:4])
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [".prepare-state.json"]  # nothing half-written
    assert writer.pending_shards() == [0, 1]
    with pytest.raises(RuntimeError, match=r"cannot finalize .* shard\(s\) \[0, 1\] not written"):
        writer.finalize({"kind": "pixels"}, None)
    writer.write_shard(1, images[4:])
    # a restarted writer with the same settings resumes; with other settings it refuses
    again = ShardedWriter(tmp_path / "d", num_items=6, item_shape=(1, 2, 2), dtype=np.uint8, shard_size=4,
                          settings={"a": 1})
    assert again.pending_shards() == [0]
    with pytest.raises(ValueError, match=r"unfinished preparation with other settings \(differing: a\)"):
        ShardedWriter(tmp_path / "d", num_items=6, item_shape=(1, 2, 2), dtype=np.uint8, shard_size=4,
                      settings={"a": 2})
    # a damaged shard is detected (and redone), and the reader refuses truncated files
    shard = tmp_path / "d" / "images-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-3])
    assert again.pending_shards() == [0, 1]
    with pytest.raises(ValueError, match="truncated"):
        open_npy(shard)
