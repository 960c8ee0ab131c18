"""Loader throughput per dataset format vs. the raw decode rate, on data this script generates (no downloads).

    python benchmarks/data.py                          # 32 and 64 px, workers 0 and 2
    python benchmarks/data.py --resolution 64 --workers 0 4 8 --images 4096

Formats (each written to a temporary directory, then read through the training loop's exact pipeline:
``DataLoader(dataset, sampler=InfiniteSampler(...), batch_size=B, num_workers=W, persistent_workers=W > 0)``):

- ``prepared``  : memory-mapped uint8 ``.npy`` shards (``python -m data.prepare``; source ``prepared``)
- ``edm-zip``   : EDM zip of PNGs written with compress_level 0 (source ``folder``)
- ``edm-zip-z6``: the same with PNG compress_level 6 (smaller files, slower decode)
- ``png-dir``   : a directory of PNG files (source ``folder``)
- ``latents``   : prepared float32 latents [4, r/8, r/8] (random values; a VAE is not needed to time loading)

"raw" is what one process does with no DataLoader: PNG decode of in-memory bytes (``PIL``) for the PNG formats, a
slice copy out of the memory map for the prepared ones. "loader" is images/s delivered in batches after one warm-up
batch. ``loader / (raw x max(W, 1))`` says how much of the decode capacity of the W processes the loader delivers
(it can exceed 1 for W = 0 only if batching costs less than a Python loop). Files are fresh, so all reads hit the
page cache: this measures CPU cost, not disk bandwidth.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import InfiniteSampler, build_dataset  # noqa: E402
from data.edm_zip import EdmZipWriter, encode_png  # noqa: E402
from data.shards import ShardedWriter, default_shard_size, open_npy  # noqa: E402


def photo_like(n: int, resolution: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, 3, r, r]: low-frequency colour fields + gradients + mild noise (compresses like photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, resolution, resolution), dtype=np.uint8)
    ramp = np.linspace(0, 255, resolution)
    for i in range(n):
        low = rng.integers(0, 256, size=(resolution // 8 + 2, resolution // 8 + 2, 3), dtype=np.uint8)
        low = np.asarray(Image.fromarray(low).resize((resolution, resolution), Image.BICUBIC), dtype=np.float64)
        img = 0.7 * low + 0.3 * ramp[None, :, None] + rng.normal(0, 6, low.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return out


def write_formats(root: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
    n, c, r, _ = images.shape
    configs = {}
    writer = ShardedWriter(root / "prepared", num_items=n, item_shape=(c, r, r), dtype=np.uint8,
                           shard_size=default_shard_size(c * r * r), settings={"bench": r})
    for k in writer.pending_shards():
        start, stop = writer.shard_range(k)
        writer.write_shard(k, images[start:stop])
    writer.finalize({"kind": "pixels", "num_classes": 10}, labels)
    configs["prepared"] = {"source": "prepared", "path": str(root / "prepared")}

    for name, level in (("edm-zip", 0), ("edm-zip-z6", 6)):
        with EdmZipWriter(root / f"{name}.zip", compress_level=level) as zw:
            for image in images:
                zw.add(image)
            zw.close(labels)
        configs[name] = {"source": "folder", "path": str(root / f"{name}.zip"), "resolution": r}

    png_dir = root / "png-dir"
    for i, image in enumerate(images):
        (png_dir / f"{i // 1000:05d}").mkdir(parents=True, exist_ok=True)
        (png_dir / f"{i // 1000:05d}" / f"img{i:08d}.png").write_bytes(encode_png(image, 6))
    (png_dir / "dataset.json").write_text(json.dumps(
        {"labels": [[f"{i // 1000:05d}/img{i:08d}.png", int(v)] for i, v in enumerate(labels)]}))
    configs["png-dir"] = {"source": "folder", "path": str(png_dir), "resolution": r}

    side = max(1, r // 8)
    latents = np.random.default_rng(1).standard_normal((n, 1, 4, side, side)).astype(np.float32)
    lw = ShardedWriter(root / "latents", num_items=n, item_shape=(1, 4, side, side), dtype=np.float32,
                       shard_size=default_shard_size(latents[0].nbytes), settings={"bench": r})
    for k in lw.pending_shards():
        start, stop = lw.shard_range(k)
        lw.write_shard(k, latents[start:stop])
    lw.finalize({"kind": "latents", "variants": 1, "num_classes": 10,
                 "latent": {"vae": "none", "scaling_factor": 0.18215, "image_resolution": r, "mean": [0.0] * 4,
                            "std": [1.0] * 4}}, labels)
    configs["latents"] = {"source": "prepared", "path": str(root / "latents")}
    return configs


def raw_rate(fmt: str, root: Path, images: np.ndarray, seconds: float) -> float:
    """Images/s one process decodes without a DataLoader."""
    from PIL import Image

    n = len(images)
    if fmt in ("prepared", "latents"):
        shards = [open_npy(p) for p in sorted((root / fmt).glob("images-*.npy"))]
        size = shards[0].shape[0]

        def one(i: int) -> None:
            torch.from_numpy(np.array(shards[i // size][i % size]))
    else:
        level = 6 if fmt in ("edm-zip-z6", "png-dir") else 0
        blobs = [encode_png(image, level) for image in images[: min(n, 512)]]

        def one(i: int) -> None:
            with Image.open(io.BytesIO(blobs[i % len(blobs)])) as img:
                torch.from_numpy(np.array(img.convert("RGB")).transpose(2, 0, 1).copy())
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, n, 7):
            one(i)
            count += 1
    return count / (time.perf_counter() - start)


def loader_rate(cfg: dict, workers: int, batch: int, seconds: float) -> float:
    dataset = build_dataset({"name": "bench", "cond": True, **cfg})
    loader = torch.utils.data.DataLoader(dataset, sampler=InfiniteSampler(len(dataset), seed=0,
                                                                         batch_size_per_rank=batch),
                                         batch_size=batch, num_workers=workers, persistent_workers=workers > 0)
    it = iter(loader)
    next(it)  # warm-up: worker start, first maps/opens
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images, _ = next(it)
        count += images.shape[0]
    rate = count / (time.perf_counter() - start)
    del it, loader
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing window per measurement")
    parser.add_argument("--formats", nargs="+", default=["prepared", "edm-zip", "edm-zip-z6", "png-dir", "latents"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__}, {args.images} images, batch {args.batch}")
    header = f"{'format':<11} {'res':>4} {'workers':>7} {'loader img/s':>13} {'raw img/s':>11} {'loader/raw':>10}" \
             f" {'vs prepared':>11}"
    print(header)
    print("-" * len(header))
    for r in args.resolution:
        images = photo_like(args.images, r)
        labels = np.arange(args.images) % 10
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            configs = write_formats(root, images, labels)
            raws = {fmt: raw_rate(fmt, root, images, args.seconds / 2) for fmt in args.formats}
            for w in args.workers:
                rates = {fmt: loader_rate(configs[fmt], w, args.batch, args.seconds) for fmt in args.formats}
                for fmt in args.formats:
                    ratio = rates[fmt] / (raws[fmt] * max(w, 1))
                    print(f"{fmt:<11} {r:>4} {w:>7} {rates[fmt]:>13,.0f} {raws[fmt]:>11,.0f} {ratio:>10.2f}"
                          f" {rates[fmt] / rates['prepared'] if 'prepared' in rates else float('nan'):>11.2f}")


if __name__ == "__main__":
    main()
