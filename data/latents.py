"""Stable-Diffusion VAE latents: encoding images for preparation, the latent normalization, decoding samples to images.

The VAE is a diffusers ``AutoencoderKL`` (default ``stabilityai/sd-vae-ft-ema``, as DiT; a hub id when online, or a
local directory saved with ``save_pretrained`` / downloaded with ``huggingface-cli download``). It maps an RGB image
x in [-1, 1] of size H x W to a diagonal Gaussian over raw latents of shape [4, H/8, W/8].

Encoding (``encode_raw``; ``python -m data.prepare latents --encoding``):
- ``sample`` (default, as DiT / fast-DiT ``extract_features``): z = mean + std * eps, one draw per image at
  preparation time; eps comes from a CPU generator seeded by (seed, image index, variant), so the result does not
  depend on batching, resumption or the device's RNG.
- ``mean``: z = mean (the posterior mode; deterministic).

Normalization between raw latents z and the model space the network sees (per channel c):
    model = (z - shift_c) * scale_c            raw = model / scale_c + shift_c
- ``scale`` (default, DiT / latent diffusion): shift = 0, scale = the VAE's ``scaling_factor`` (0.18215 for the SD
  VAEs), giving roughly unit variance.
- ``channel`` (EDM2): shift = per-channel mean, scale = target_std / per-channel std (target 0.5 = sigma_data),
  with the mean/std measured over the prepared dataset and stored in its ``meta.json``.

Decoding (``LatentCodec.decode``) inverts the normalization, runs the VAE decoder and quantizes exactly as pixel
datasets are: u = floor(clamp(x * 127.5 + 128, 0, 255)) (``data.to_uint8``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .dataset import to_uint8

__all__ = [
    "DEFAULT_VAE",
    "SD_SCALING_FACTOR",
    "ENCODINGS",
    "LATENT_NORMS",
    "LatentCodec",
    "load_vae",
    "latent_normalization",
    "latent_noise",
]

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
SD_SCALING_FACTOR = 0.18215
DOWNSAMPLE = 8
ENCODINGS = ("sample", "mean")
LATENT_NORMS = ("scale", "channel")


def load_vae(vae: str, subfolder: str | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32):
    """A diffusers ``AutoencoderKL`` in eval mode from a hub id or local directory; clear errors when unavailable."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError("latent datasets need diffusers: pip install diffusers") from e
    kwargs: dict[str, Any] = {"subfolder": subfolder} if subfolder else {}
    try:
        import accelerate  # noqa: F401
    except ImportError:
        kwargs["low_cpu_mem_usage"] = False  # what diffusers falls back to anyway, without its warning
    try:
        model = AutoencoderKL.from_pretrained(str(vae), **kwargs)
    except Exception as e:  # OSError (not found / offline), ValueError (bad config), HF hub errors
        local = os.path.isdir(os.path.expanduser(str(vae)))
        hint = (
            "the directory must hold config.json and the weights (diffusion_pytorch_model.safetensors)"
            if local
            else f"without network access download it elsewhere (`huggingface-cli download {vae} --local-dir DIR`) "
            f"and pass the local DIR as --vae / data.vae"
        )
        raise OSError(f"cannot load the VAE '{vae}'{f' (subfolder {subfolder})' if subfolder else ''}: "
                      f"{type(e).__name__}: {e}\n{hint}") from e
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def latent_normalization(latent_meta: Mapping[str, Any], norm: str = "scale",
                         target_std: float = 0.5) -> tuple[list[float], list[float]]:
    """(scale per channel, shift per channel) of a normalization (see module doc) from a dataset's latent metadata."""
    channels = len(latent_meta["mean"])
    if norm == "scale":
        return [float(latent_meta["scaling_factor"])] * channels, [0.0] * channels
    if norm == "channel":
        if target_std <= 0:
            raise ValueError(f"data.latent_std must be positive, got {target_std}")
        return [float(target_std) / float(s) for s in latent_meta["std"]], [float(m) for m in latent_meta["mean"]]
    raise ValueError(f"unknown data.latent_norm {norm!r}; valid: {', '.join(LATENT_NORMS)}")


def latent_noise(shape: Sequence[int], seed: int, index: int, variant: int) -> Tensor:
    """The standard normal draw used to sample image ``index``'s posterior (variant 1: its mirrored copy)."""
    state = np.random.SeedSequence([int(seed), int(index), int(variant)]).generate_state(1, dtype=np.uint64)[0]
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(state)))


def _per_channel(values: float | Sequence[float], channels: int, what: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"latent {what} has {t.numel()} values for {channels} channels")
    return t.reshape(1, channels, 1, 1).clone()


class LatentCodec:
    """Turns images into model-space latents and back, for one VAE and one normalization.

    Args:
        vae: hub id or local directory of a diffusers ``AutoencoderKL`` (loaded on first use).
        subfolder: optional subfolder of ``vae`` (e.g. "vae" inside a full Stable Diffusion repository).
        scale, shift: the normalization ``model = (raw - shift) * scale`` (scalars or one value per channel).
        latent_channels: C (4 for the SD VAEs).
        device, dtype: where and in which precision the VAE runs.
        batch_size: images per VAE call in ``encode_raw`` / ``decode``.
    """

    def __init__(
        self,
        vae: str = DEFAULT_VAE,
        *,
        subfolder: str | None = None,
        scale: float | Sequence[float] = SD_SCALING_FACTOR,
        shift: float | Sequence[float] = 0.0,
        latent_channels: int = 4,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> None:
        self.vae_name = str(vae)
        self.subfolder = subfolder
        self.latent_channels = int(latent_channels)
        self.scale = _per_channel(scale, self.latent_channels, "scale")
        self.shift = _per_channel(shift, self.latent_channels, "shift")
        if bool((self.scale == 0).any()):
            raise ValueError("latent scale must be non-zero")
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self._vae = None

    # --- construction from stored metadata ------------------------------------------------------------------------
    @classmethod
    def from_info(cls, info: Mapping[str, Any], **kwargs: Any) -> LatentCodec:
        """From a dataset's ``latent_info`` (also stored in checkpoints): keys vae, vae_subfolder, scale, shift."""
        return cls(info["vae"], subfolder=info.get("vae_subfolder"), scale=info["scale"], shift=info["shift"],
                   latent_channels=len(info["scale"]), **kwargs)

    @classmethod
    def from_dataset(cls, dataset: Any, **kwargs: Any) -> LatentCodec:
        """From a latent dataset object (``data.build_dataset``) or a prepared directory's path."""
        if isinstance(dataset, str | os.PathLike):
            from .prepared import PreparedDataset

            dataset = PreparedDataset(dataset)
        info = getattr(dataset, "latent_info", None)
        if info is None:
            raise ValueError(f"{getattr(dataset, 'name', dataset)!r} is a pixel dataset; no VAE decoding applies")
        return cls.from_info(info, **kwargs)

    @property
    def vae(self):
        if self._vae is None:
            self._vae = load_vae(self.vae_name, self.subfolder, self.device, self.dtype)
            channels = int(self._vae.config.latent_channels)
            if channels != self.latent_channels:
                raise ValueError(
                    f"VAE '{self.vae_name}' has {channels} latent channels, expected {self.latent_channels}")
        return self._vae

    def set_vae(self, vae: Any) -> LatentCodec:
        """Use an already-built ``AutoencoderKL`` (moved to the codec's device and dtype)."""
        self._vae = vae.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        return self

    # --- normalization ----------------------------------------------------------------------------------------------
    def to_model(self, raw: Tensor) -> Tensor:
        """Raw VAE latents -> model space: ``(raw - shift) * scale`` (float32)."""
        return (raw.float() - self.shift.to(raw.device)) * self.scale.to(raw.device)

    def to_raw(self, latents: Tensor) -> Tensor:
        """Model space -> raw VAE latents: ``latents / scale + shift`` (float32)."""
        return latents.float() / self.scale.to(latents.device) + self.shift.to(latents.device)

    # --- VAE --------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_raw(self, images: Tensor, encoding: str = "sample", *, seed: int = 0,
                   indices: Sequence[int] | None = None, variant: int = 0) -> Tensor:
        """uint8 images [N, 3, H, W] -> raw latents float32 [N, C, H/8, W/8] on the CPU.

        ``sample`` draws eps with ``latent_noise(seed, indices[i], variant)`` (indices default to 0..N-1).
        """
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode expects uint8 RGB images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if images.shape[-1] % DOWNSAMPLE or images.shape[-2] % DOWNSAMPLE:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of {DOWNSAMPLE}")
        indices = list(range(images.shape[0])) if indices is None else list(indices)
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start : start + self.batch_size].to(self.device, non_blocking=True)
            x = x.to(self.dtype) / 127.5 - 1
            dist = self.vae.encode(x).latent_dist
            mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
            if encoding == "mean":
                out.append(mean)
            else:
                eps = torch.stack([latent_noise(mean.shape[1:], seed, i, variant)
                                   for i in indices[start : start + self.batch_size]])
                out.append(mean + std * eps)
        return torch.cat(out)

    @torch.no_grad()
    def encode(self, images: Tensor, encoding: str = "sample", **kwargs: Any) -> Tensor:
        """uint8 images -> model-space latents (``to_model(encode_raw(...))``)."""
        return self.to_model(self.encode_raw(images, encoding, **kwargs))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Model-space latents [N, C, h, w] -> uint8 images [N, 3, 8h, 8w] on the latents' device."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"decode expects latents [N, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        out = []
        for start in range(0, latents.shape[0], self.batch_size):
            raw = self.to_raw(latents[start : start + self.batch_size].to(self.device))
            x = self.vae.decode(raw.to(self.dtype)).sample
            out.append(to_uint8(x.float()).to(latents.device))
        return torch.cat(out)

    def __repr__(self) -> str:
        return (f"LatentCodec(vae={self.vae_name!r}, scale={self.scale.flatten().tolist()}, "
                f"shift={self.shift.flatten().tolist()}, device={self.device})")
