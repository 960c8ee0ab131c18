"""Tests of data.augment.AugmentPipe (EDM's geometric augmentation) against independent computations.

References: the filter's orthonormality conditions (closed form), torch.flip / torch.rot90 / numpy reflect-padding
for the exact operations, and for the random general transforms the centroid of a Gaussian blob moved by the affine
map rebuilt in the test from the labels alone (an affine warp moves an image's centroid by the same map).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.augment import EDM_STRENGTHS, SYM6, AugmentPipe, build_augment_pipe, downsample2x, upsample2x

ALL_OFF = {"xflip": 0, "yflip": 0, "scale": 0, "rotate_frac": 0, "aniso": 0, "translate_frac": 0}


def smooth_images(n=2, c=3, size=32, seed=0):
    """Band-limited test images: bicubic upsampling of 6x6 noise."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, c, 6, 6, generator=g), size=size, mode="bicubic", align_corners=False)


def test_sym6_is_an_orthonormal_lowpass_with_six_vanishing_moments():
    h = np.array(SYM6)
    assert abs(h.sum() - math.sqrt(2)) < 1e-12
    for k in range(6):  # sum_n h[n] h[n + 2k] = delta_k
        assert abs(np.dot(h[2 * k :], h[: len(h) - 2 * k]) - (k == 0)) < 1e-11
    g = h[::-1] * (-1.0) ** np.arange(12)  # the matching high-pass kills polynomials of degree < 6
    assert all(abs((g * np.arange(12.0) ** m).sum()) < 1e-6 for m in range(6))


def test_up_then_down_is_the_identity():
    x = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    up = upsample2x(x)
    assert up.shape == (2, 3, 40, 40)
    # exact away from the borders (the filter support there reaches outside the image)
    assert torch.allclose(downsample2x(up)[..., 4:-4, 4:-4], x[..., 4:-4, 4:-4], atol=1e-5)
    # and the 2x image of a constant is the constant (DC gain 1) in the interior
    assert torch.allclose(upsample2x(torch.ones(1, 1, 16, 16))[..., 8:-8, 8:-8], torch.ones(1, 1, 16, 16), atol=1e-6)


def test_p_zero_is_identity_with_zero_labels():
    x = torch.randn(5, 3, 16, 16)
    pipe = AugmentPipe(0.0)
    state = torch.get_rng_state()
    y, labels = pipe(x)
    assert torch.equal(y, x) and labels.shape == (5, 9) and not labels.any()
    assert torch.equal(torch.get_rng_state(), state)  # p = 0 draws nothing
    assert build_augment_pipe({"augment": 0}) is None and build_augment_pipe({}) is None
    edm = build_augment_pipe({"augment": 0.12})
    assert edm.p == 0.12 and edm.augment_dim == 9 and edm.strengths["xflip"] == EDM_STRENGTHS["xflip"]
    with pytest.raises(ValueError, match=r"data.augment must be a probability in \[0, 1\]"):
        build_augment_pipe({"augment": 1.5})


def test_xflip_only_at_p1_flips_exactly_and_sets_its_label():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    pipe = AugmentPipe(1.0, **{**ALL_OFF, "xflip": 1})
    assert pipe.augment_dim == 1
    y, labels = pipe(x)
    assert labels.shape == (64, 1) and set(labels[:, 0].tolist()) == {0.0, 1.0}
    for i in range(64):
        expected = x[i].flip(-1) if labels[i, 0] == 1 else x[i]
        assert torch.equal(y[i], expected)
    # yflip flips the other axis
    y, labels = AugmentPipe(1.0, **{**ALL_OFF, "yflip": 1})(x)
    flipped = labels[:, 0] == 1
    assert torch.equal(y[flipped], x[flipped].flip(-2)) and torch.equal(y[~flipped], x[~flipped])


def test_rotate_int_and_translate_int_reproduce_the_labelled_operation():
    torch.manual_seed(1)
    x = torch.randn(48, 2, 16, 16)
    y, labels = AugmentPipe(1.0, **ALL_OFF, rotate_int=1)(x)
    ks = set()
    for i in range(48):
        k = round(math.atan2(labels[i, 1].item(), labels[i, 0].item() + 1) / (math.pi / 2)) % 4
        ks.add(k)
        assert torch.equal(y[i], torch.rot90(x[i], k, dims=(-2, -1)))
    assert ks == {0, 1, 2, 3}

    pipe = AugmentPipe(1.0, **ALL_OFF, translate_int=1)
    y, labels = pipe(x)
    shifts = labels * (16 * pipe.translate_int_max)  # label = shift / (size * max)
    assert torch.allclose(shifts, shifts.round(), atol=1e-5) and shifts.abs().max() <= 2
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect")
    for i in range(48):
        tx, ty = (int(v) for v in shifts[i].round().tolist())
        expected = padded[i, :, 4 - ty : 4 - ty + 16, 4 - tx : 4 - tx + 16]  # content moves right by tx, down by ty
        assert np.array_equal(y[i].numpy(), expected)


def test_identity_transform_through_the_resampler_is_exact():
    # Every general op enabled but with zero parameters: the image goes through pad/up/grid_sample/down unchanged.
    x = torch.randn(3, 3, 32, 32)
    pipe = AugmentPipe(1.0, xflip=0, yflip=0)
    zero = {"scale": torch.zeros(3), "rotate_frac": torch.zeros(3), "aniso": torch.zeros(2, 3),
            "translate_frac": torch.zeros(2, 3)}
    y, labels = pipe.apply(x, zero)
    assert torch.allclose(y, x, atol=1e-4) and not labels.any() and labels.shape == (3, 7)


def test_fractional_ops_at_special_values_match_exact_operations():
    x = smooth_images()
    amplitude = x.abs().max().item()
    pipe = AugmentPipe(1.0, **{**ALL_OFF, "rotate_frac": 1, "translate_frac": 1})
    zero2 = torch.zeros(2, 2)
    for k in (1, 2, -1):
        y, labels = pipe.apply(x, {"rotate_frac": torch.full((2,), k * math.pi / 2), "translate_frac": zero2})
        assert torch.allclose(labels[:, :2], torch.tensor([math.cos(k * math.pi / 2) - 1, math.sin(k * math.pi / 2)]),
                              atol=1e-6)
        err = (y - torch.rot90(x, k, dims=(-2, -1))).abs()
        # sym6 is not linear-phase, so a rotated band-limited image is close to, not bit-equal to, torch.rot90
        assert err.max() < 0.03 * amplitude and err.mean() < 0.003 * amplitude, (k, err.max(), err.mean())
    # a fractional translation by an integer number of pixels is exact: 3 px right, 2 px up
    w = torch.tensor([[3.0, 3.0], [-2.0, -2.0]]) / (32 * pipe.translate_frac_std)
    y, labels = pipe.apply(x, {"rotate_frac": torch.zeros(2), "translate_frac": w})
    expected = np.pad(x.numpy(), ((0, 0), (0, 0), (8, 8), (8, 8)), mode="reflect")[:, :, 10:42, 5:37]
    assert np.abs(y.numpy() - expected).max() < 1e-4
    assert torch.allclose(labels[:, 2:], w.T)


def _blob(size, cx, cy, sigma):
    coords = torch.arange(size) + 0.5 - size / 2
    return torch.exp(-((coords[None, :] - cx) ** 2 + (coords[:, None] - cy) ** 2) / (2 * sigma**2))


def _centroid(image, around=None, radius=14.0):
    """Intensity centroid (centred pixel coordinates), optionally only within ``radius`` of a point: shrinking
    transforms bring reflected copies of the blob (reflection padding, as ADA) into view far from the original."""
    coords = torch.arange(image.shape[-1], dtype=torch.float64) + 0.5 - image.shape[-1] / 2
    xx, yy = coords[None, :].expand_as(image), coords[:, None].expand_as(image)
    weight = image.double()
    if around is not None:
        weight = weight * (((xx - around[0]) ** 2 + (yy - around[1]) ** 2) <= radius**2)
    return ((weight * xx).sum() / weight.sum()).item(), ((weight * yy).sum() / weight.sum()).item()


def test_labels_encode_the_applied_geometry():
    """A blob's centroid moves by the forward map T A R S rebuilt from the 9 EDM labels (plus the flips)."""
    torch.manual_seed(3)
    size, n, p0 = 64, 24, (5.0, -4.0)
    x = _blob(size, *p0, sigma=2.5).expand(n, 1, size, size).contiguous()
    pipe = AugmentPipe(1.0, translate_frac_std=0.06)  # EDM's set; smaller shifts keep the blob inside the frame
    y, lab = pipe(x)
    assert lab.shape == (n, 9)
    for i in range(n):
        xf, yf, ws, rc, rs, ax, ay, tx, ty = lab[i].tolist()
        px, py = (-p0[0] if xf else p0[0]), (-p0[1] if yf else p0[1])
        s = 2 ** (ws * 0.2)
        px, py = s * px, s * py
        theta = math.atan2(rs, rc + 1)  # label (cos - 1, sin)
        c, sn = math.cos(theta), math.sin(theta)
        px, py = c * px + sn * py, -sn * px + c * py  # counter-clockwise on screen (y down)
        w, r = math.hypot(ax, ay), math.atan2(ay, ax) / 2  # label w (cos 2r, sin 2r): axis angle doubled
        sa = 2 ** (w * 0.2)
        u, v = math.cos(r) * px + math.sin(r) * py, -math.sin(r) * px + math.cos(r) * py  # into the stretch frame
        u, v = sa * u, v / sa
        px, py = math.cos(r) * u - math.sin(r) * v, math.sin(r) * u + math.cos(r) * v
        px, py = px + tx * size * 0.06, py + ty * size * 0.06
        got = _centroid(y[i, 0], around=(px, py))
        assert abs(got[0] - px) < 0.02 and abs(got[1] - py) < 0.02, (i, lab[i], got, (px, py))


def test_each_op_applied_with_probability_p_and_label_distributions():
    torch.manual_seed(4)
    n, p = 4000, 0.3
    y, lab = AugmentPipe(p)(torch.zeros(n, 1, 8, 8))
    tol = 4 * math.sqrt(p * (1 - p) / n)
    assert abs((lab[:, 0] == 1).float().mean() - 0.5) < 4 * math.sqrt(0.25 / n)  # xflip=1e8: always a fair coin
    assert abs((lab[:, 1] == 1).float().mean() - p / 2) < tol  # yflip applied w.p. p, then a fair coin
    for cols in ([2], [3, 4], [5, 6], [7, 8]):  # scale, rotate, aniso, translate
        assert abs((lab[:, cols] != 0).any(1).float().mean() - p) < tol
    applied = lab[:, 2] != 0
    assert abs(lab[applied, 2].mean()) < 0.15 and abs(lab[applied, 2].std() - 1) < 0.1  # scale label ~ N(0, 1)
    cos_sin = lab[:, 3:5] + torch.tensor([1.0, 0.0])
    assert torch.allclose(cos_sin.norm(dim=1), torch.ones(n), atol=1e-5)  # (cos - 1, sin) lies on the circle
    assert not y.any()  # geometric ops map a zero image to zero


def test_runs_under_the_global_rng_and_rejects_bad_input():
    x = smooth_images(4)
    pipe = AugmentPipe(0.5)
    torch.manual_seed(7)
    a = pipe(x)
    torch.manual_seed(7)
    b = pipe(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(TypeError, match="float images"):
        pipe(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        AugmentPipe(1.2)
