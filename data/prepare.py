"""``python -m data.prepare <source> ...``: turn a raw source into a training-ready dataset, once.

Sources (sub-commands)::

    python -m data.prepare cifar10  --source cifar-10-python.tar.gz --dest datasets/cifar10-32x32 [--split test]
    python -m data.prepare imagenet --source ILSVRC2012/train --dest datasets/imagenet-64x64 --resolution 64
                                    [--transform center-crop|adm|none]
    python -m data.prepare folder   --source DIR_OR_ZIP --dest OUT --resolution R [--transform adm|center-crop|none]
                                    [--labels auto|json|dirs|none] [--channels 1|3]
    python -m data.prepare latents  --source ILSVRC2012/train --labels dirs --dest datasets/imagenet-256-sdvae
                                    --resolution 256 --vae stabilityai/sd-vae-ft-ema [--flip] [--encoding sample|mean]

Outputs (``--format``): ``array`` (default) — a prepared directory of memory-mappable ``.npy`` shards + labels +
``meta.json`` (``data.shards`` documents it; read by ``data.source=prepared``, and by ``data=cifar10`` when
``data.path`` points at one); ``zip`` — an EDM-style zip of PNGs + ``dataset.json`` (``data.edm_zip``; read by
``data.source=folder``), for pixel sources only. Latents are always arrays: raw VAE latents ``[n, V, 4, r/8, r/8]``
with per-channel mean/std in the metadata and, with ``--flip``, the latent of each mirrored image as variant 1.

Preprocessing (``--transform``, ``data.transforms``): ``center-crop`` (EDM's: the largest central square, one
LANCZOS resize; the default of ``imagenet``, as EDM prepared ImageNet-64 and its published reference statistics),
``adm`` (ADM's ``center_crop_arr``: box-halving, bicubic, central crop; the default of ``folder`` and ``latents``, as
DiT / EDM2 / Hang et al. prepare ImageNet-256/512), ``none`` (sizes must match). The transform is recorded in
``meta.json`` (``source.transform``) and in reference statistics made from the data (``evaluate.py ref=true``).

Behaviour: a tqdm progress bar; images are decoded in ``--workers`` processes; array outputs are written shard by shard
atomically, so re-running the same command after an interruption resumes (finished shards are skipped) and a crash
never leaves a partial file; a zip is written to a temporary name and renamed at the end. A corrupt or unreadable
image stops the run with its file name and PIL's reason (fix or remove it and re-run to resume).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .edm_zip import EdmZipWriter
from .image_source import LABEL_MODES, ImageSource
from .imagenet import imagenet_source
from .shards import ShardedWriter, default_shard_size, is_prepared, open_npy, read_meta
from .transforms import TRANSFORMS, prepare_image

__all__ = ["main", "prepare_cifar10", "prepare_images", "prepare_latents", "FORMATS"]

FORMATS = ("array", "zip")


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _progress(total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc=desc, dynamic_ncols=True, mininterval=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Reading source images in parallel
# ---------------------------------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _worker_init(source: ImageSource, transform: str, resolution: int, channels: int) -> None:
    _WORKER.update(source=source, transform=transform, resolution=resolution, channels=channels)


def _worker_load(index: int) -> np.ndarray:
    source: ImageSource = _WORKER["source"]
    name = source.names[index]
    return prepare_image(source.read_bytes(name), name, _WORKER["transform"], _WORKER["resolution"],
                         _WORKER["channels"], where=str(source.path))


class _ImageReader:
    """Decoded, transformed images of a source by index, in order: in ``workers`` processes (0: in this one)."""

    def __init__(self, source: ImageSource, transform: str, resolution: int, channels: int, workers: int) -> None:
        self.args = (source, transform, resolution, channels)
        self.workers = int(workers)
        self.pool = None
        if self.workers > 0:
            # fork: the (possibly huge) file list is shared, not pickled; created before any CUDA initialisation.
            self.pool = mp.get_context("fork").Pool(self.workers, initializer=_worker_init, initargs=self.args)

    def read(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        if self.pool is None:
            _worker_init(*self.args)
            return map(_worker_load, indices)
        chunk = max(1, min(64, len(indices) // (4 * self.workers) or 1))
        return self.pool.imap(_worker_load, indices, chunksize=chunk)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> _ImageReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _limit(source: ImageSource, max_images: int | None) -> ImageSource:
    if max_images is not None:
        if max_images <= 0:
            raise ValueError(f"--max-images must be positive, got {max_images}")
        source.names = source.names[:max_images]
        if source.labels is not None:
            source.labels = source.labels[:max_images]
    return source


# ---------------------------------------------------------------------------------------------------------------------
# Writers shared by the pixel sources
# ---------------------------------------------------------------------------------------------------------------------
def _write_pixels(
    dest: Path,
    *,
    num: int,
    item_shape: tuple[int, int, int],
    read: Callable[[Sequence[int]], Iterator[np.ndarray]],
    labels: np.ndarray | None,
    num_classes: int,
    class_names: list[str] | None,
    source_meta: dict[str, Any],
    settings: dict[str, Any],
    fmt: str,
    shard_size: int | None,
    png_level: int,
    command: str,
    desc: str,
) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "zip":
        if dest.suffix.lower() != ".zip":
            raise ValueError(f"--format zip needs a --dest ending in .zip, got '{dest}'")
        with EdmZipWriter(dest, compress_level=png_level) as writer, _progress(num, 0, desc) as bar:
            for image in read(range(num)):
                writer.add(image)
                bar.update(1)
            return writer.close(labels)

    shard_size = shard_size or default_shard_size(int(np.prod(item_shape)))
    writer = ShardedWriter(dest, num_items=num, item_shape=item_shape, dtype=np.uint8, shard_size=shard_size,
                           settings={"kind": "pixels", **settings}, command=command)
    if writer.complete:
        print(f"'{dest}' is already complete; nothing to do", file=sys.stderr)
        return dest
    pending = writer.pending_shards()
    done = num - sum(writer.shard_range(k)[1] - writer.shard_range(k)[0] for k in pending)
    with _progress(num, done, desc) as bar:
        for k in pending:
            start, stop = writer.shard_range(k)
            shard = np.empty((stop - start, *item_shape), dtype=np.uint8)
            for j, image in enumerate(read(range(start, stop))):
                shard[j] = image
                bar.update(1)
            writer.write_shard(k, shard)
    writer.finalize({"kind": "pixels", "num_classes": num_classes, "class_names": class_names,
                     "source": source_meta}, labels)
    return dest


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------------------------------
def prepare_cifar10(source: str | os.PathLike, dest: str | os.PathLike, *, split: str = "train", fmt: str = "array",
                    shard_size: int | None = None, png_level: int = 0, command: str = "") -> Path:
    """CIFAR-10 python archive (or its extracted folder) -> a prepared dataset of one split, labels included."""
    from .cifar10 import NUM_CLASSES, load_cifar10_arrays

    images, labels = load_cifar10_arrays(source, split)
    import hashlib

    fingerprint = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return _write_pixels(
        Path(dest), num=len(images), item_shape=tuple(images.shape[1:]),
        read=lambda idx: (images[i] for i in idx), labels=labels, num_classes=NUM_CLASSES, class_names=None,
        source_meta={"type": "cifar10", "path": str(Path(source).resolve()), "split": split},
        settings={"source": "cifar10", "split": split, "fingerprint": fingerprint}, fmt=fmt, shard_size=shard_size,
        png_level=png_level, command=command, desc=f"cifar10 {split}",
    )


# ---------------------------------------------------------------------------------------------------------------------
# Image folders, zips and ImageNet
# ---------------------------------------------------------------------------------------------------------------------
def prepare_images(source: ImageSource, dest: str | os.PathLike, *, resolution: int, transform: str = "adm",
                   channels: int = 3, fmt: str = "array", workers: int = 0, shard_size: int | None = None,
                   max_images: int | None = None, png_level: int = 0, source_type: str = "folder",
                   command: str = "") -> Path:
    """Images of a folder / zip / ILSVRC tree -> ``resolution`` x ``resolution`` by ``transform``, with labels."""
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown --transform {transform!r}; valid: {', '.join(TRANSFORMS)}")
    if resolution <= 0:
        raise ValueError(f"--resolution must be positive, got {resolution}")
    source = _limit(source, max_images)
    item_shape = (channels, resolution, resolution)
    with _ImageReader(source, transform, resolution, channels, workers) as reader:
        return _write_pixels(
            Path(dest), num=len(source), item_shape=item_shape, read=reader.read, labels=source.labels,
            num_classes=source.num_classes, class_names=source.class_names,
            source_meta={"type": source_type, "path": str(source.path.resolve()), "transform": transform,
                         "resolution": resolution, "labels": source.label_mode},
            settings={"source": source_type, "fingerprint": source.fingerprint(), "transform": transform,
                      "resolution": resolution, "channels": channels},
            fmt=fmt, shard_size=shard_size, png_level=png_level, command=command,
            desc=f"{source_type} {resolution}x{resolution}",
        )


# ---------------------------------------------------------------------------------------------------------------------
# Latents
# ---------------------------------------------------------------------------------------------------------------------
class _PreparedPixels:
    """A prepared pixel dataset as a source for latent encoding."""

    def __init__(self, path: Path, resolution: int, max_images: int | None) -> None:
        meta = read_meta(path)
        if meta["kind"] != "pixels":
            raise ValueError(f"--source '{path}' holds {meta['kind']}; latents are encoded from pixels")
        c, h, _ = meta["item_shape"]
        if (c, h) != (3, resolution):
            raise ValueError(f"--source '{path}' holds {c}x{h}x{h} images; --resolution {resolution} needs 3x"
                             f"{resolution}x{resolution} (or pass the original image folder)")
        self.path, self.meta = path, meta
        self.shards = [open_npy(path / f) for f in meta["shards"]]
        self.num = min(meta["num_images"], max_images or meta["num_images"])
        self.labels = np.load(path / "labels.npy")[: self.num] if meta["labels"] else None
        self.num_classes = int(meta.get("num_classes") or 0)
        self.class_names = meta.get("class_names")

    def read(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        size = self.meta["shard_size"]
        return (self.shards[i // size][i % size] for i in indices)


def _latent_stats(shards: list[np.ndarray], channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over every stored latent (all variants), in float64."""
    total, total_sq, count = np.zeros(channels), np.zeros(channels), 0
    for shard in shards:
        for start in range(0, shard.shape[0], 1024):
            block = np.asarray(shard[start : start + 1024], dtype=np.float64)  # [n, V, C, h, w]
            total += block.sum(axis=(0, 1, 3, 4))
            total_sq += np.square(block).sum(axis=(0, 1, 3, 4))
            count += block.size // channels
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0)
    return mean.tolist(), np.sqrt(var).tolist()


@dataclass
class _LatentSource:
    """The images ``prepare_latents`` encodes (``read``), their labels, and how the metadata describes them."""

    num: int
    read: Callable[[Sequence[int]], Iterator[np.ndarray]]
    labels: np.ndarray | None
    num_classes: int
    class_names: list[str] | None
    fingerprint: str
    meta: dict[str, Any]
    reader: _ImageReader | None = None  # decoding worker processes, closed by the caller


def _latent_source(source_path: Path, *, resolution: int, transform: str, labels: str, workers: int,
                   max_images: int | None) -> _LatentSource:
    """A prepared pixel directory (read as stored) or an image source (decoded and transformed by workers)."""
    if is_prepared(source_path):
        prepared = _PreparedPixels(source_path, resolution, max_images)
        return _LatentSource(prepared.num, prepared.read, prepared.labels, prepared.num_classes, prepared.class_names,
                             fingerprint=f"{prepared.meta['settings']}",
                             meta={"type": "prepared", "path": str(source_path.resolve()), "resolution": resolution})
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown --transform {transform!r}; valid: {', '.join(TRANSFORMS)}")
    image_source = _limit(ImageSource(source_path, labels=labels), max_images)
    num, source_labels = len(image_source), image_source.labels
    num_classes, class_names = image_source.num_classes, image_source.class_names
    fingerprint = image_source.fingerprint()
    meta = {"type": "folder", "path": str(source_path.resolve()), "transform": transform, "resolution": resolution,
            "labels": image_source.label_mode}
    reader = _ImageReader(image_source, transform, resolution, 3, workers)  # before CUDA is initialised
    return _LatentSource(num, reader.read, source_labels, num_classes, class_names, fingerprint, meta, reader)


def _encode_pending_shards(writer: ShardedWriter, read: Callable[[Sequence[int]], Iterator[np.ndarray]],
                           encode: Callable[[list[np.ndarray], int], np.ndarray], *, item_shape: tuple[int, ...],
                           store: np.dtype, batch: int, num: int, resolution: int) -> None:
    """Encode and write every shard not written yet, ``batch`` images at a time, with a progress bar."""
    pending = writer.pending_shards()
    done = num - sum(writer.shard_range(k)[1] - writer.shard_range(k)[0] for k in pending)
    with _progress(num, done, f"latents {resolution}px") as bar:
        for k in pending:
            start, stop = writer.shard_range(k)
            shard = np.empty((stop - start, *item_shape), dtype=store)
            images: list[np.ndarray] = []
            for i, image in enumerate(read(range(start, stop)), start=start):
                images.append(image)
                if len(images) == batch or i == stop - 1:
                    first = i + 1 - len(images)
                    shard[first - start : i + 1 - start] = encode(images, first)
                    bar.update(len(images))
                    images = []
            writer.write_shard(k, shard)


def prepare_latents(source: str | os.PathLike, dest: str | os.PathLike, *, resolution: int = 256,
                    transform: str = "adm", labels: str = "auto", vae: str | None = None,
                    vae_subfolder: str | None = None, encoding: str = "sample", flip: bool = False, seed: int = 0,
                    batch: int = 32, device: str | None = None, dtype: str = "float32", workers: int = 0,
                    shard_size: int | None = None, max_images: int | None = None, command: str = "") -> Path:
    """Images (folder / zip / ILSVRC tree / prepared pixels) -> raw SD-VAE latents in shards, with channel stats."""
    import torch

    from .latents import DEFAULT_VAE, DOWNSAMPLE, ENCODINGS, LatentCodec, load_vae

    vae = vae or DEFAULT_VAE
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown --encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"unknown --dtype {dtype!r}; valid: float32, float16")
    if resolution % DOWNSAMPLE:
        raise ValueError(f"--resolution must be a multiple of {DOWNSAMPLE}, got {resolution}")
    src = _latent_source(Path(source).expanduser(), resolution=resolution, transform=transform, labels=labels,
                         workers=workers, max_images=max_images)
    try:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        vae_model = load_vae(vae, vae_subfolder, device)
        channels = int(vae_model.config.latent_channels)
        scaling = float(getattr(vae_model.config, "scaling_factor", None) or 0.18215)
        codec = LatentCodec(vae, subfolder=vae_subfolder, latent_channels=channels, device=device,
                            batch_size=batch).set_vae(vae_model)
        variants = 2 if flip else 1
        side = resolution // DOWNSAMPLE
        item_shape = (variants, channels, side, side)
        store = np.dtype(dtype)
        shard_size = shard_size or default_shard_size(int(np.prod(item_shape)) * store.itemsize)
        writer = ShardedWriter(
            dest, num_items=src.num, item_shape=item_shape, dtype=store, shard_size=shard_size, command=command,
            settings={"kind": "latents", "fingerprint": src.fingerprint, "resolution": resolution,
                      "transform": transform, "vae": vae, "vae_subfolder": vae_subfolder, "encoding": encoding,
                      "flip": flip, "seed": seed},
        )
        if writer.complete:
            print(f"'{dest}' is already complete; nothing to do", file=sys.stderr)
            return Path(dest)

        def encode(images: list[np.ndarray], first: int) -> np.ndarray:
            """Raw latents [n, V, C, h, w] of images first, first + 1, ... (variant 1: the mirrored image)."""
            x = torch.from_numpy(np.stack(images))
            idx = range(first, first + len(images))
            out = [codec.encode_raw(x, encoding, seed=seed, indices=idx, variant=0)]
            if flip:
                out.append(codec.encode_raw(x.flip(-1), encoding, seed=seed, indices=idx, variant=1))
            return torch.stack(out, dim=1).numpy()

        _encode_pending_shards(writer, src.read, encode, item_shape=item_shape, store=store, batch=batch,
                               num=src.num, resolution=resolution)
        mean, std = _latent_stats(writer.shards(), channels)
        latent_meta = {"vae": vae, "vae_subfolder": vae_subfolder, "scaling_factor": scaling, "encoding": encoding,
                       "seed": seed, "image_resolution": resolution, "flip_copies": flip, "mean": mean, "std": std}
        writer.finalize({"kind": "latents", "variants": variants, "num_classes": src.num_classes,
                         "class_names": src.class_names, "source": src.meta, "latent": latent_meta}, src.labels)
        return Path(dest)
    finally:
        if src.reader is not None:
            src.reader.close()


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{cifar10,imagenet,folder,latents}")

    def common(p: argparse.ArgumentParser, pixels: bool = True) -> None:
        p.add_argument("--dest", required=True, help="output directory (array) or .zip file (--format zip)")
        p.add_argument("--shard-size", type=int, default=None, help="items per shard (default: about 256 MiB)")
        if pixels:
            p.add_argument("--format", choices=FORMATS, default="array", help="prepared arrays or EDM zip of PNGs")
            p.add_argument("--png-level", type=int, default=0, help="PNG compress level of --format zip (EDM: 0)")

    def images(p: argparse.ArgumentParser, transform: str, res: int | None) -> None:
        p.add_argument("--resolution", type=int, default=res, required=res is None)
        p.add_argument("--transform", choices=list(TRANSFORMS), default=transform,
                       help="center-crop: EDM's (largest central square, LANCZOS); adm: ADM's center_crop_arr "
                            "(box halving, bicubic); none: images already r x r (default: %(default)s)")
        p.add_argument("--workers", type=int, default=_default_workers(), help="decoding processes (0: in-process)")
        p.add_argument("--max-images", type=int, default=None, help="only the first N images (smoke tests)")

    p = sub.add_parser("cifar10", help="CIFAR-10 python archive -> prepared dataset")
    p.add_argument("--source", required=True, help="cifar-10-python.tar.gz or its extracted directory")
    p.add_argument("--split", choices=("train", "test"), default="train")
    common(p)

    p = sub.add_parser("imagenet", help="ILSVRC train/<wnid>/*.JPEG -> r x r (EDM's center crop), class-labelled")
    p.add_argument("--source", required=True, help="the ILSVRC-2012 train folder (one sub-folder per synset)")
    images(p, "center-crop", 64)
    common(p)

    p = sub.add_parser("folder", help="any image folder or zip -> r x r")
    p.add_argument("--source", required=True)
    p.add_argument("--labels", choices=LABEL_MODES, default="auto")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3)
    images(p, "adm", None)
    common(p)

    p = sub.add_parser("latents", help="images -> Stable Diffusion VAE latents (+ per-channel statistics)")
    p.add_argument("--source", required=True, help="image folder / zip / ILSVRC train folder / prepared pixel dir")
    p.add_argument("--labels", choices=LABEL_MODES, default="auto", help="use 'dirs' for the ILSVRC train folder")
    images(p, "adm", 256)
    p.add_argument("--vae", default=None, help="diffusers AutoencoderKL: hub id or local dir "
                                               "(default stabilityai/sd-vae-ft-ema)")
    p.add_argument("--vae-subfolder", default=None)
    p.add_argument("--encoding", choices=("sample", "mean"), default="sample")
    p.add_argument("--flip", action="store_true", help="also store the latents of the mirrored images (fast-DiT)")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples (--encoding sample)")
    p.add_argument("--batch", type=int, default=32, help="images per VAE call")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage precision")
    common(p, pixels=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    command = shlex.join(["python", "-m", "data.prepare", *argv])
    start = time.time()
    try:
        if args.command == "cifar10":
            out = prepare_cifar10(args.source, args.dest, split=args.split, fmt=args.format,
                                  shard_size=args.shard_size, png_level=args.png_level, command=command)
        elif args.command in ("imagenet", "folder"):
            if args.command == "imagenet":
                source, channels = imagenet_source(args.source), 3
            else:
                source, channels = ImageSource(args.source, labels=args.labels), args.channels
            out = prepare_images(source, args.dest, resolution=args.resolution, transform=args.transform,
                                 channels=channels, fmt=args.format, workers=args.workers,
                                 shard_size=args.shard_size, max_images=args.max_images, png_level=args.png_level,
                                 source_type=args.command, command=command)
        else:
            out = prepare_latents(args.source, args.dest, resolution=args.resolution, transform=args.transform,
                                  labels=args.labels, vae=args.vae, vae_subfolder=args.vae_subfolder,
                                  encoding=args.encoding, flip=args.flip, seed=args.seed, batch=args.batch,
                                  device=args.device, dtype=args.dtype, workers=args.workers,
                                  shard_size=args.shard_size, max_images=args.max_images, command=command)
    except (ValueError, FileNotFoundError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote '{out}' in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
