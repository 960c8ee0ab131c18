"""FD-DINOv2 (evaluation/dinov2.py): EDM2's preprocessing, the ViT's layout and forward pass, the metric, the weights.

Independent references: the antialiased bicubic resize written out here in numpy from its definition (Keys' cubic
with a = -0.5, support widened by the downscaling factor, weights normalised: the filter of PIL and of torch's
``antialias=True``) and checked against PIL itself; the official ViT-L/14 state-dict layout and its published
parameter count (304,368,640, timm's ``vit_large_patch14_dinov2``); a transformer forward pass written out here with
explicit layer norms and einsum attention; the exact bicubic interpolation of a linear field; the Fréchet distance of
features taken directly from the network. No download: the weights are random, written by the tests.
"""

from __future__ import annotations

import math
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation import dinov2
from evaluation.dinov2 import (
    EXTRACTOR_NAME,
    IMAGENET_MEAN,
    IMAGENET_STD,
    WEIGHTS_URL,
    DinoV2ViT,
    DinoV2WeightsUnavailableError,
    dinov2_weights_file,
    edm2_preprocess,
)
from evaluation.frechet import fid_from_features
from evaluation.metrics import compute_metrics
from evaluation.reference_stats import (
    compute_reference_statistics,
    load_reference_statistics,
    save_reference_statistics,
)


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------------------
def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of the antialiased bicubic filter: output pixel i samples around (i + 0.5) * n_in / n_out
    with the kernel stretched by max(1, n_in / n_out), taps clipped to the image and normalised to sum 1."""
    scale = n_in / n_out
    stretch = max(1.0, scale)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - 2 * stretch + 0.5), 0), min(int(centre + 2 * stretch + 0.5), n_in)
        taps = np.arange(lo, hi)
        w = _cubic((taps + 0.5 - centre) / stretch)
        m[i, lo:hi] = w / w.sum()
    return m


def _reference_preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 3, H, W] -> EDM2's network input, in float64, by explicit separable resampling."""
    n, c, h, w = images.shape
    rows, cols = _resample_matrix(h, 224), _resample_matrix(w, 224)
    x = rows @ images.astype(np.float64) @ cols.T
    mean, std = np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1), np.array(IMAGENET_STD).reshape(1, 3, 1, 1)
    return (x / 255 - mean) / std


@pytest.mark.parametrize("size", [64, 512, 137])
def test_preprocessing_is_the_antialiased_bicubic_resize(size):
    rng = np.random.default_rng(size)
    smooth = rng.integers(0, 256, size=(2, 3, size // 8 + 2, size // 8 + 2), dtype=np.uint8)
    images = F.interpolate(torch.from_numpy(smooth).float(), size=(size, size), mode="bilinear")
    images = (images + torch.from_numpy(rng.normal(0, 20, size=(2, 3, size, size))).float()).clamp(40, 215)
    images = images.round().to(torch.uint8)  # (kept off 0 and 255: PIL clips its intermediate, horizontal pass)
    ours = edm2_preprocess(images).double().numpy()
    expected = _reference_preprocess(images.numpy())
    assert np.abs(ours - expected).max() < 2e-4
    # The written-out filter is PIL's BICUBIC (which rounds to uint8 after each of its two passes): within 1.5 levels.
    pil = np.stack([np.asarray(Image.fromarray(im.transpose(1, 2, 0)).resize((224, 224), Image.BICUBIC))
                    for im in images.numpy()]).transpose(0, 3, 1, 2).astype(np.float64)
    unnormalised = (expected * np.array(IMAGENET_STD).reshape(1, 3, 1, 1)
                    + np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1)) * 255
    assert np.abs(np.clip(unnormalised, 0, 255) - pil).max() <= 1.5
    if size > 224:  # torch-fidelity's dinov2 resize (TF1 bilinear, no antialiasing) is another image: not comparable
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        tf1 = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(224, 224), align_corners=False)
        assert (tf1.double().numpy() - unnormalised).std() > 5


# ---------------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------------
def _official_layout(dim=1024, depth=24, grid=37):
    """Key -> shape of the official dinov2_vitl14 state dict (ViT-L/14, 518-px position grid, LayerScale)."""
    layout = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        layout.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
                       b + "attn.qkv.bias": (3 * dim,), b + "attn.proj.weight": (dim, dim),
                       b + "attn.proj.bias": (dim,),
                       b + "ls1.gamma": (dim,), b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                       b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                       b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,), b + "ls2.gamma": (dim,)})
    return layout


def test_vit_l14_has_the_official_layout_and_size():
    with torch.device("meta"):
        model = DinoV2ViT(1024, 24)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == _official_layout()
    assert sum(math.prod(s) for s in shapes.values()) == 304_368_640


def _random_state(dim=64, depth=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ones = ("gamma", "norm1.weight", "norm2.weight", "norm.weight")  # LayerScale and LayerNorm scales around 1
    return {k: torch.randn(s, generator=g) * (0.02 if len(s) > 1 else 0.5) + (1.0 if k.endswith(ones) else 0.0)
            for k, s in _official_layout(dim, depth).items()}


def _reference_forward(state, x):
    """The ViT written out: patches, CLS, positions (given), pre-norm blocks with einsum attention."""
    def ln(t, p):
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-6) * state[p + ".weight"] + state[p + ".bias"]

    dim = state["cls_token"].shape[-1]
    heads = dim // 64
    patches = torch.einsum("nchpwq,dcpq->nhwd", x.unflatten(2, (-1, 14)).unflatten(4, (-1, 14)),
                           state["patch_embed.proj.weight"]) + state["patch_embed.proj.bias"]
    t = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), patches.flatten(1, 2)], 1) + state["pos_embed"]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        h = ln(t, b + "norm1")
        q, k, v = (h @ state[b + "attn.qkv.weight"].T + state[b + "attn.qkv.bias"]).chunk(3, -1)
        q, k, v = (z.unflatten(-1, (heads, 64)) for z in (q, k, v))
        att = torch.softmax(torch.einsum("nihd,njhd->nhij", q, k) / 8.0, -1)
        o = torch.einsum("nhij,njhd->nihd", att, v).flatten(2)
        t = t + state[b + "ls1.gamma"] * (o @ state[b + "attn.proj.weight"].T + state[b + "attn.proj.bias"])
        h = ln(t, b + "norm2")
        h = h @ state[b + "mlp.fc1.weight"].T + state[b + "mlp.fc1.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        t = t + state[b + "ls2.gamma"] * (h @ state[b + "mlp.fc2.weight"].T + state[b + "mlp.fc2.bias"])
    return ln(t, "norm")[:, 0]


def test_forward_matches_a_written_out_transformer():
    state = _random_state(dim=128, depth=2)
    model = DinoV2ViT.from_state_dict(state)
    x = torch.randn(2, 3, 518, 518, generator=torch.Generator().manual_seed(1))  # the stored 37 x 37 grid: no resize
    with torch.no_grad():
        assert torch.allclose(model(x), _reference_forward(state, x), atol=1e-4, rtol=1e-4)


def _bicubic_at(grid: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Keys' cubic convolution (a = -0.75, torch's non-antialiased bicubic) of ``grid`` along ``axis`` at source
    coordinates ``coords``, taps clamped to the border."""
    n = grid.shape[axis]
    base = np.floor(coords).astype(int)
    out = 0
    for k in range(-1, 3):
        idx = np.clip(base + k, 0, n - 1)
        w = _cubic(coords - (base + k), a=-0.75)
        out = out + np.take(grid, idx, axis=axis) * np.expand_dims(w, tuple(d for d in range(grid.ndim) if d != axis))
    return out


def test_position_grid_is_interpolated_with_the_official_offset():
    """At 224 px the 16 x 16 patch grid samples the stored 37 x 37 position grid at (j + 0.5) * 37 / 16.1 - 0.5
    (scale factor (16 + 0.1) / 37, as the official model), by bicubic interpolation without antialiasing."""
    model = DinoV2ViT(128, 0)
    torch.nn.init.normal_(model.pos_embed, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        pos = model.position_embeddings(16, 16)[0]
    stored = model.pos_embed[0, 1:].detach().double().numpy().reshape(37, 37, 128)
    coords = (np.arange(16) + 0.5) * 37 / 16.1 - 0.5
    expected = _bicubic_at(_bicubic_at(stored, coords, 0), coords, 1).reshape(256, 128)
    assert torch.equal(pos[0], model.pos_embed[0, 0].detach())  # the CLS position is kept
    assert np.abs(pos[1:].double().numpy() - expected).max() < 5e-5  # float32 arithmetic
    without_offset = (np.arange(16) + 0.5) * 37 / 16 - 0.5
    assert np.abs(_bicubic_at(_bicubic_at(stored, without_offset, 0), without_offset, 1).reshape(256, 128)
                  - expected).max() > 0.05  # the offset matters


def test_a_state_dict_of_another_network_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a DINOv2 ViT state dict.*dinov2_vitl14_pretrain.pth"):
        DinoV2ViT.from_state_dict({"conv.weight": torch.zeros(1)})
    state = _random_state(dim=64, depth=1)
    state["blocks.0.ls1.gamma"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="ls1.gamma"):
        DinoV2ViT.from_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------------
# The metric
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vitl14_pretrain.pth"
    torch.save(_random_state(dim=64, depth=1, seed=3), path)
    return str(path)


def _images(seed, n=12, size=32, channels=3):
    return torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_fd_dinov2_between_two_sets(weights, tmp_path):
    a, b = _images(0), (_images(1).float() * 0.5 + 60).to(torch.uint8)
    cfg = {"dinov2_weights_path": weights, "cache_dir": str(tmp_path), "batch": 5}
    out = compute_metrics(a, b, metrics=["fd_dinov2", "prc", "fid"], feature_extractor=EXTRACTOR_NAME, eval_cfg=cfg)
    assert set(out) == {"fd_dinov2", "fid_dinov2", "prc_dinov2_precision", "prc_dinov2_recall", "prc_dinov2_f_score"}
    model = DinoV2ViT.from_state_dict(torch.load(weights, weights_only=True))
    with torch.no_grad():
        fa, fb = model(edm2_preprocess(a)), model(edm2_preprocess(b))
    assert out["fd_dinov2"] == pytest.approx(fid_from_features(fa, fb), rel=1e-5)
    assert out["fid_dinov2"] == pytest.approx(out["fd_dinov2"], rel=1e-3)  # torch-fidelity's FID of the same features
    same = compute_metrics(a, a.clone(), metrics=["fd_dinov2"], feature_extractor=EXTRACTOR_NAME, eval_cfg=cfg)
    assert abs(same["fd_dinov2"]) < 1e-6 * out["fd_dinov2"]
    gray = compute_metrics(a[:, :1], b[:, :1], metrics=["fd_dinov2"], feature_extractor=EXTRACTOR_NAME, eval_cfg=cfg)
    with torch.no_grad():  # grayscale is repeated to RGB
        expected = fid_from_features(model(edm2_preprocess(a[:, :1].repeat(1, 3, 1, 1))),
                                     model(edm2_preprocess(b[:, :1].repeat(1, 3, 1, 1))))
    assert gray["fd_dinov2"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="isc needs class logits"):
        compute_metrics(a, b, metrics=["isc"], feature_extractor=EXTRACTOR_NAME, eval_cfg=cfg)


def test_reference_statistics_hold_fd_dinov2(weights, tmp_path):
    gen, ref = _images(2), _images(3)
    cfg = {"dinov2_weights_path": weights, "cache_dir": str(tmp_path), "metrics": ["fd_dinov2"]}
    stats = compute_reference_statistics(ref, feature_extractor=EXTRACTOR_NAME, eval_cfg=cfg)
    path = save_reference_statistics(tmp_path / "ref.npz", stats)
    loaded = load_reference_statistics(path)
    assert loaded["fd_dinov2_mu"].shape == (64,) and loaded["fd_dinov2_extractor_id"].startswith(EXTRACTOR_NAME)
    kw = dict(metrics=["fd_dinov2"], feature_extractor=EXTRACTOR_NAME, eval_cfg=cfg)
    against_file = compute_metrics(gen, None, reference_stats=str(path), **kw)["fd_dinov2"]
    against_images = compute_metrics(gen, ref, **kw)["fd_dinov2"]
    assert against_file == pytest.approx(against_images, rel=1e-6)
    plain = save_reference_statistics(tmp_path / "plain.npz", {k: stats[k] for k in ("mu", "sigma")})
    with pytest.raises(ValueError, match="holds no DINOv2 statistics.*eval.metrics=\\[fid,fd_dinov2\\]"):
        compute_metrics(gen, None, reference_stats=str(plain), **kw)


# ---------------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------------
def test_missing_weights_fail_fast_with_the_file_and_its_url(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"dinov2_vitl14_pretrain.pth from {WEIGHTS_URL}"):
        dinov2_weights_file({"dinov2_weights_path": str(tmp_path / "missing.pth")})
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, progress=True):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(DinoV2WeightsUnavailableError, match=f"(?s){WEIGHTS_URL}.*eval.dinov2_weights_path="):
        dinov2_weights_file({})
    # the CLI stops in its preflight, before any features are extracted
    import evaluation.feature_metrics as fm
    from evaluation.run import run_evaluation
    from tests.helpers import compose

    samples = tmp_path / "samples.npz"
    np.savez(samples, samples=np.zeros((4, 8, 8, 1), np.uint8))
    monkeypatch.setattr(fm, "get_featuresdict_from_dataset", lambda *a, **k: pytest.fail("features extracted"))
    overrides = [f"samples={samples}", "eval.metrics=[fd_dinov2]", f"eval.dinov2_weights_path={tmp_path / 'x.pth'}",
                 f"out={tmp_path / 'out.json'}"]
    with pytest.raises(FileNotFoundError, match="eval.dinov2_weights_path=.*x.pth does not exist"):
        run_evaluation(compose("evaluate", overrides), overrides)
    assert dinov2.EXTRACTOR_NAME in __import__("torch_fidelity").registry.FEATURE_EXTRACTORS_REGISTRY
