"""Tests of latent preparation (``python -m data.prepare latents``), latent datasets and ``LatentCodec``.

A small randomly initialised diffusers ``AutoencoderKL`` (8 channels, the SD layout of 4 blocks = 8x downsampling,
4 latent channels) is saved to a local directory, as a real VAE would be. References are computed in the test by
calling that VAE directly on images preprocessed by the test's own ADM reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from data import LatentCodec, build_dataset, to_uint8
from data.latents import latent_noise
from data.prepare import main, prepare_latents
from data.shards import META_FILE, STATE_FILE, read_meta
from tests.test_prepare import CONFIGS, _photo, adm_reference

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae(vae_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_dir, low_cpu_mem_usage=False).eval()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("imgs") / "train"
    files = []
    for synset in ("n01530575", "n01440764"):
        (root / synset).mkdir(parents=True)
        for k in range(5):
            w, h = [(70, 50), (33, 47), (128, 96), (40, 40), (90, 64)][k]
            name = f"{synset}/{synset}_{k}.JPEG"
            Image.fromarray(_photo(rng, w, h)).save(root / name, quality=92)
            files.append(name)
    return root, sorted(files)


def _cfg(name, **kw):
    return OmegaConf.merge(OmegaConf.load(CONFIGS / f"{name}.yaml"), kw)


def _args(source, dest, vae_dir, *extra):
    return ["latents", "--source", str(source), "--dest", str(dest), "--resolution", "32", "--vae", str(vae_dir),
            "--labels", "dirs", "--device", "cpu", "--workers", "0", "--batch", "3", "--shard-size", "4", *extra]


def _stored(dest):
    meta = read_meta(dest)
    return np.concatenate([np.load(dest / f) for f in meta["shards"]])


@torch.no_grad()
def _posterior(vae, images_uint8):
    dist = vae.encode(torch.from_numpy(np.stack(images_uint8)).float() / 127.5 - 1).latent_dist
    return dist.mean, dist.std


def test_latent_prepare_values_stats_and_dataset(image_dir, vae_dir, vae, tmp_path):
    root, files = image_dir
    dest = tmp_path / "latents"
    assert main(_args(root, dest, vae_dir, "--flip", "--seed", "5")) == 0
    meta = read_meta(dest)
    assert meta["kind"] == "latents" and meta["item_shape"] == [2, 4, 4, 4] and meta["variants"] == 2
    assert meta["latent"]["scaling_factor"] == pytest.approx(0.18215) and meta["latent"]["vae"] == str(vae_dir)
    assert meta["class_names"] == ["n01440764", "n01530575"] and len(meta["shards"]) == 3

    stored = _stored(dest)  # [10, 2, 4, 4, 4] raw latents
    pixels = [adm_reference(root / name, 32) for name in files]
    mean, std = _posterior(vae, pixels)
    fmean, fstd = _posterior(vae, [p[:, :, ::-1].copy() for p in pixels])
    for i in range(len(files)):  # z = mean + std * eps(seed, index, variant)
        z0 = mean[i] + std[i] * latent_noise((4, 4, 4), 5, i, 0)
        z1 = fmean[i] + fstd[i] * latent_noise((4, 4, 4), 5, i, 1)
        assert np.allclose(stored[i, 0], z0.numpy(), atol=1e-5) and np.allclose(stored[i, 1], z1.numpy(), atol=1e-5)
    # per-channel statistics over everything stored
    per_channel = stored.transpose(2, 0, 1, 3, 4).reshape(4, -1).astype(np.float64)
    assert np.allclose(meta["latent"]["mean"], per_channel.mean(1), atol=1e-6)
    assert np.allclose(meta["latent"]["std"], per_channel.std(1), atol=1e-6)

    # the dataset: float32 model-space items (x 0.18215), flip copies as items N..2N-1, labels by sorted synset
    ds = build_dataset(_cfg("imagenet256_latent", path=str(dest), resolution=4))
    assert ds.latent and ds.label_dim == 2 and len(ds) == 20 and (ds.num_channels, ds.resolution) == (4, 4)
    assert ds.image_resolution == 32 and ds.latent_info["scale"] == [pytest.approx(0.18215)] * 4
    for i in (0, 4, 9):
        item, label = ds[i]
        flipped, flabel = ds[10 + i]
        assert item.dtype == torch.float32 and torch.allclose(item, torch.from_numpy(stored[i, 0]) * 0.18215)
        assert torch.allclose(flipped, torch.from_numpy(stored[i, 1]) * 0.18215)
        assert label == flabel == ["n01440764", "n01530575"].index(files[i].split("/")[0])
    # EDM2-style per-channel normalization: every item together has channel mean 0 and std latent_std exactly
    norm = build_dataset(_cfg("imagenet256_latent", path=str(dest), resolution=4, latent_norm="channel",
                              latent_std=0.5))
    items = torch.stack([norm[i][0] for i in range(len(norm))]).double()
    assert torch.allclose(items.mean((0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(items.std((0, 2, 3), unbiased=False), torch.full((4,), 0.5, dtype=torch.float64), atol=1e-5)
    with pytest.raises(ValueError, match=r"unknown data.latent_norm 'per_pixel'; valid: scale, channel"):
        build_dataset(_cfg("imagenet256_latent", path=str(dest), resolution=4, latent_norm="per_pixel"))


def test_codec_decode_encode_scaling(image_dir, vae_dir, vae, tmp_path):
    root, files = image_dir
    dest = tmp_path / "latents-mean"
    assert main(_args(root, dest, vae_dir, "--encoding", "mean")) == 0
    for norm in ("scale", "channel"):
        ds = build_dataset(_cfg("imagenet256_latent", path=str(dest), resolution=4, xflip=False, latent_norm=norm))
        codec = LatentCodec.from_dataset(ds)
        assert torch.equal(LatentCodec.from_info(ds.latent_info).scale, codec.scale)
        scale = torch.tensor(ds.latent_info["scale"]).view(1, 4, 1, 1)
        shift = torch.tensor(ds.latent_info["shift"]).view(1, 4, 1, 1)
        z = torch.stack([ds[i][0] for i in range(4)])
        images = codec.decode(z)
        assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
        with torch.no_grad():
            expected = to_uint8(vae.decode(z / scale + shift).sample)
        assert (images.int() - expected.int()).abs().max() <= 1  # float rounding at the quantization step
        # encode(mean) of the preprocessed pixels reproduces the stored model-space items
        pixels = torch.from_numpy(np.stack([adm_reference(root / name, 32) for name in files[:4]]))
        assert torch.allclose(codec.encode(pixels, "mean"), z, atol=1e-5)
        # and decode(encode(x)) is an image batch of the input's shape
        assert codec.decode(codec.encode(pixels, "mean")).shape == pixels.shape
    # the path constructor, and the metadata-less (pixel) case
    assert LatentCodec.from_dataset(str(dest)).vae_name == str(vae_dir)
    with pytest.raises(ValueError, match="pixel dataset"):
        LatentCodec.from_dataset(build_dataset(OmegaConf.load(CONFIGS / "digits.yaml")))
    with pytest.raises(ValueError, match=r"data.xflip=true but .* stores no flipped latents.*--flip"):
        build_dataset(_cfg("imagenet256_latent", path=str(dest), resolution=4))


def test_latents_from_prepared_pixels_match_folder(image_dir, vae_dir, tmp_path):
    root, _ = image_dir
    pixels = tmp_path / "pixels"
    assert main(["imagenet", "--source", str(root), "--dest", str(pixels), "--resolution", "32",
                 "--transform", "adm", "--workers", "0"]) == 0
    a, b = tmp_path / "from-folder", tmp_path / "from-pixels"
    assert main(_args(root, a, vae_dir, "--encoding", "mean")) == 0
    assert main(_args(pixels, b, vae_dir, "--encoding", "mean")) == 0
    assert np.allclose(_stored(a), _stored(b), atol=1e-6)
    assert np.array_equal(np.load(a / "labels.npy"), np.load(b / "labels.npy"))


def test_latent_resume_skips_finished_shards(image_dir, vae_dir, tmp_path):
    root, files = image_dir
    src = tmp_path / "train"
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((root / name).read_bytes())
    good = (src / files[9]).read_bytes()
    (src / files[9]).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # the third shard (items 8, 9)
    dest = tmp_path / "resumed"
    with pytest.raises(ValueError, match=rf"cannot read image '{files[9]}'"):
        prepare_latents(src, dest, resolution=32, labels="dirs", vae=str(vae_dir), device="cpu", shard_size=4,
                        batch=3, command="python -m data.prepare latents ...")
    assert sorted(p.name for p in dest.iterdir()) == [STATE_FILE, "images-00000.npy", "images-00001.npy"]
    with pytest.raises(FileNotFoundError, match=r"unfinished preparation.*\n    python -m data.prepare latents"):
        build_dataset(_cfg("imagenet256_latent", path=str(dest), resolution=4, xflip=False))
    inodes = {p.name: p.stat().st_ino for p in dest.glob("images-*.npy")}
    (src / files[9]).write_bytes(good)
    assert main(_args(src, dest, vae_dir)) == 0
    assert {p.name: p.stat().st_ino for p in dest.glob("images-0000[01].npy")} == inodes
    assert (dest / META_FILE).is_file() and not (dest / STATE_FILE).exists()
    clean = tmp_path / "clean"
    assert main(_args(src, clean, vae_dir)) == 0
    assert np.array_equal(_stored(dest), _stored(clean))  # same draws whether resumed or not
    assert read_meta(dest)["latent"]["mean"] == read_meta(clean)["latent"]["mean"]


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated:UserWarning")
def test_vae_errors(image_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: fail fast, no retries
    root, _ = image_dir
    with pytest.raises(OSError, match=r"cannot load the VAE 'stabilityai/sd-vae-ft-ema'.*\n.*huggingface-cli download"):
        prepare_latents(root, tmp_path / "x", resolution=32, device="cpu")
    (tmp_path / "empty-vae").mkdir()
    with pytest.raises(OSError, match=r"cannot load the VAE '.*empty-vae'.*\n.*must hold config.json"):
        prepare_latents(root, tmp_path / "x", resolution=32, vae=str(tmp_path / "empty-vae"), device="cpu")
    assert main(_args(root, tmp_path / "y", tmp_path / "empty-vae")) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing written before the VAE loads
    with pytest.raises(ValueError, match="multiple of 8"):
        prepare_latents(root, tmp_path / "z", resolution=36)
