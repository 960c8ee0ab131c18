"""FD-DINOv2: the Fréchet distance in the features of DINOv2 ViT-L/14, preprocessed as EDM2 does.

**The metric.** Stein et al. 2023 ("Exposing flaws of generative model evaluation metrics and their unfair treatment
of diffusion models", arXiv 2306.04675) found the Inception-v3 features of FID to miss what humans see in diffusion
samples and proposed the Fréchet distance in the 1024-d CLS features of DINOv2 ViT-L/14 (Oquab et al. 2023, arXiv
2304.07193). EDM2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", arXiv
2312.02696) reports it beside FID as FD_DINOv2 (its Tables 2 and 3; 50,000 samples against the statistics of the
whole training set). ``eval.metrics=[fd_dinov2]`` computes it; the result key is ``fd_dinov2``. The same features
serve KID and precision/recall with ``eval.feature_extractor=dinov2-vit-l-14-edm2`` (keys ``kid_dinov2_*``,
``prc_dinov2_*``; ``fid_dinov2`` is then FD-DINOv2 again; IS has no meaning on these features and is refused).

**Preprocessing (``edm2_preprocess``), as EDM2's ``calculate_metrics.py`` (its default ``resize_mode='torch'``):**
uint8 images [N, 3, H, W] are converted to float32 (0..255, no rounding), resized to 224 x 224 by bicubic
interpolation *with* antialiasing (``F.interpolate(..., mode='bicubic', antialias=True)``: the PIL-style filter whose
support widens with the downscaling factor; no clamping), divided by 255, and normalised with the ImageNet mean
(0.485, 0.456, 0.406) and standard deviation (0.229, 0.224, 0.225). EDM2 notes that this "yields almost the same
results" as the PIL bicubic resize of Stein et al.'s dgm-eval (uint8 in, uint8 out). Grayscale images are repeated to
three channels first.

**Which published numbers compare.** Numbers from this extractor compare with EDM2's published FD_DINOv2 (and with
dgm-eval's up to the resize difference above) at the same sample count and reference set. They do *not* compare with
torch-fidelity's own ``dinov2-vit-l-14`` extractor, which resizes with TF1-style bilinear interpolation and no
antialiasing (a visibly different 224-px image when downsampling 512-px samples), nor with FID.

**The network (``DinoV2ViT``)** is written here with the state-dict layout of the official ``dinov2_vitl14`` weights
(``cls_token``, ``pos_embed`` for a 37 x 37 grid (518 px), ``mask_token``, ``patch_embed.proj``, ``blocks.<i>.{norm1,
attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm``): pre-norm blocks with LayerScale,
LayerNorm eps 1e-6, exact GELU, 64-d heads; the output is the final-norm CLS token. At 224 px the 16 x 16 patch grid
takes the position embeddings by bicubic interpolation of the 37 x 37 grid with scale factor (16 + 0.1) / 37 and no
antialiasing, as the official model does. The width, depth and heads are read from the state dict (heads of 64
channels), so a small random network of the same layout goes through the same code in the tests.

**Weights.** ``eval.dinov2_weights_path`` names the official file ``dinov2_vitl14_pretrain.pth`` (``WEIGHTS_URL``);
without it the file is taken from torch hub's cache (``<torch hub dir>/checkpoints``), downloaded there first when
missing, under a socket timeout; with no network and no file the evaluation stops at once
(``DinoV2WeightsUnavailableError``, naming the file and the URL). The extractor is registered with torch-fidelity as
``dinov2-vit-l-14-edm2`` (``register_dinov2``).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

__all__ = [
    "EXTRACTOR_NAME",
    "FEATURE_NAME",
    "WEIGHTS_URL",
    "INPUT_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DinoV2WeightsUnavailableError",
    "edm2_preprocess",
    "DinoV2ViT",
    "DinoV2FeaturesEDM2",
    "register_dinov2",
    "dinov2_weights_file",
]

EXTRACTOR_NAME = "dinov2-vit-l-14-edm2"
FEATURE_NAME = "dinov2"
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_SIZE = 14
HEAD_DIM = 64  # every DINOv2 ViT has 64-channel attention heads (ViT-L/14: 1024 = 16 x 64)
POS_OFFSET = 0.1  # added to the patch-grid size when the position embeddings are interpolated (official model)
DOWNLOAD_TIMEOUT_S = 60.0


class DinoV2WeightsUnavailableError(RuntimeError):
    """The DINOv2 weights could not be found or downloaded."""


def edm2_preprocess(images: Tensor) -> Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 3, 224, 224]: bicubic resize with antialiasing on 0..255 floats, then
    ``(x / 255 - mean) / std`` (module docstring)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"DINOv2 features need uint8 RGB images [N, 3, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    x = F.interpolate(images.to(torch.float32), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True,
                      align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x / 255 - mean) / std


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head dim)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    """x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, hidden)
        self.ls2 = _LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, patches, dim], patches in row-major order


class DinoV2ViT(nn.Module):
    """DINOv2's ViT with the official state-dict layout (module docstring); ``forward`` returns the CLS features.
    ViT-L/14: ``DinoV2ViT(1024, 24)``; ``from_state_dict`` reads the size from the weights."""

    def __init__(self, dim: int = 1024, depth: int = 24, grid: int = 37, mlp_ratio: int = 4) -> None:
        super().__init__()
        if dim % HEAD_DIM:
            raise ValueError(f"DINOv2 widths are multiples of {HEAD_DIM} (64-channel heads), got {dim}")
        self.grid = grid
        self.patch_embed = _PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # used in training only; kept for the layout
        self.blocks = nn.ModuleList(_Block(dim, dim // HEAD_DIM, mlp_ratio * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> DinoV2ViT:
        """A network of the state dict's size with its weights (strict: a file of another layout fails here)."""
        missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight") if k not in state]
        if missing:
            raise ValueError(f"not a DINOv2 ViT state dict: no {', '.join(missing)} (expected the layout of "
                             f"{os.path.basename(WEIGHTS_URL)})")
        dim = int(state["cls_token"].shape[-1])
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        grid = math.isqrt(int(state["pos_embed"].shape[1]) - 1)
        hidden = state.get("blocks.0.mlp.fc1.weight")
        if hidden is None:
            raise ValueError("this DINOv2 state dict has no blocks.0.mlp.fc1 (a SwiGLU network such as ViT-g/14?); "
                             "FD-DINOv2 uses ViT-L/14")
        model = cls(dim, depth, grid, int(hidden.shape[0]) // dim)
        model.load_state_dict(state, strict=True)
        return model

    def position_embeddings(self, rows: int, cols: int) -> Tensor:
        """[1, 1 + rows * cols, dim]: the CLS position and the patch grid's, bicubically interpolated from the
        stored grid with scale factors (rows + 0.1) / grid and (cols + 0.1) / grid (no antialiasing)."""
        pos = self.pos_embed.float()
        if rows == cols == self.grid:
            return pos
        dim = pos.shape[-1]
        grid = pos[:, 1:].reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        scale = ((rows + POS_OFFSET) / self.grid, (cols + POS_OFFSET) / self.grid)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
        if tuple(grid.shape[-2:]) != (rows, cols):
            raise RuntimeError(f"position grid interpolated to {tuple(grid.shape[-2:])}, expected {(rows, cols)}")
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        rows, cols = x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embeddings(rows, cols).to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


class DinoV2FeaturesEDM2(FeatureExtractorBase):
    """torch-fidelity feature extractor ``dinov2-vit-l-14-edm2``: uint8 [N, 3, H, W] -> ``dinov2`` [N, 1024]
    (EDM2's preprocessing, then ``DinoV2ViT``); the weights file is required (``dinov2_weights_file`` finds it)."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise DinoV2WeightsUnavailableError(_unavailable_message(None))
        state = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        self.model = DinoV2ViT.from_state_dict(state)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"expected uint8 images [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        features = self.model(edm2_preprocess(x)).to(torch.float32)
        return tuple(features for _ in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (FEATURE_NAME,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"fid": FEATURE_NAME, "kid": FEATURE_NAME, "prc": FEATURE_NAME}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


def register_dinov2() -> None:
    """Register ``DinoV2FeaturesEDM2`` with torch-fidelity (idempotent)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if FEATURE_EXTRACTORS_REGISTRY.get(EXTRACTOR_NAME) is not DinoV2FeaturesEDM2:
        FEATURE_EXTRACTORS_REGISTRY.pop(EXTRACTOR_NAME, None)
        register_feature_extractor(EXTRACTOR_NAME, DinoV2FeaturesEDM2)


def _hub_file() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS_URL))


def _unavailable_message(err: BaseException | None) -> str:
    fname = os.path.basename(WEIGHTS_URL)
    why = f" ({type(err).__name__}: {err})" if err is not None else ""
    return (f"the DINOv2 ViT-L/14 weights for FD-DINOv2 are not available{why}.\n"
            f"Download {WEIGHTS_URL} (the official {fname}) on a machine with network access, copy it here and pass\n"
            f"    eval.dinov2_weights_path=/path/to/{fname}\n"
            f"(or place it at {_hub_file()}, torch hub's cache).")


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds if previous is None else previous)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def dinov2_weights_file(settings: Mapping[str, Any], data_cfg: Any = None) -> str:
    """The DINOv2 weights: ``eval.dinov2_weights_path`` (must exist), else torch hub's cached copy of the official
    file, downloaded first if missing; ``DinoV2WeightsUnavailableError`` / ``FileNotFoundError`` otherwise."""
    explicit = settings.get("dinov2_weights_path")
    if explicit is not None:
        path = os.path.expanduser(str(explicit))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"eval.dinov2_weights_path={path} does not exist; it should be the official "
                                    f"DINOv2 ViT-L/14 file {os.path.basename(WEIGHTS_URL)} from {WEIGHTS_URL}")
        return path
    hub = _hub_file()
    if not os.path.isfile(hub):
        try:
            os.makedirs(os.path.dirname(hub), exist_ok=True)
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                torch.hub.download_url_to_file(WEIGHTS_URL, hub, progress=False)
        except (URLError, OSError, RuntimeError, ValueError) as err:
            raise DinoV2WeightsUnavailableError(_unavailable_message(err)) from err
    return hub


register_dinov2()
