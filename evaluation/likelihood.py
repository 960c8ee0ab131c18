"""Likelihood of a model on a data split (``eval.metrics=[nll]``); the maths is in ``diffusion/likelihood.py``.

On ``eval.nll_num_images`` images of the ``eval.nll_split`` split (default: held out), image i with seed
``eval.seed + i``. 8-bit data: the dequantised probability-flow-ODE NLL in bits/dim on the [0, 256) scale
(``nll_ode_bpd``; adaptive RK45 or fixed-step Heun, Hutchinson trace with ``eval.nll_probes`` Rademacher/Gaussian
probes); binarized data: the continuous-time variational bound (``nll_elbo_bpd``), an upper bound on the model's
discrete NLL, from ``eval.nll_elbo_sigma_min`` (default 0.2, where the rounding decoder is exact; see
diffusion/likelihood.py §3), and beside it the same bound from the sampler's σ_min, ``nll_elbo_bpd_smin<σ_min>``
(e.g. ``nll_elbo_bpd_smin0.002``): the two conventions of §3, which can rank training schedules differently. ``_sem``
keys are the standard errors of the mean over the images. σ range otherwise: the sampler's
``sigma_min``/``sigma_max``. Under torchrun the images are split over the ranks
(``evaluation/ranks.py``) and every rank returns the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from configs import to_plain_dict
from data import build_dataset
from diffusion.likelihood import NLL_METHODS, nll_bits_per_dim
from evaluation.ranks import gather_rows, rank_slice, rank_split
from evaluation.settings import eval_settings
from training.distributed import all_gather_object

__all__ = ["NLL_MEASURES", "likelihood_metrics", "format_likelihood", "elbo_key"]

NLL_MEASURES = {
    "ode": "dequantised probability-flow-ODE NLL, bits/dim on the [0, 256) pixel scale (upper bound on the 8-bit NLL)",
    "elbo": "continuous-time variational bound (negative ELBO), bits/dim (upper bound on the binary data's NLL)",
}


def elbo_key(sigma_min: float | None = None) -> str:
    """The metric key of the binary ELBO: ``nll_elbo_bpd`` from ``eval.nll_elbo_sigma_min`` (None), else
    ``nll_elbo_bpd_smin<σ_min>`` for the bound from the sampler's σ_min."""
    return "nll_elbo_bpd" if sigma_min is None else f"nll_elbo_bpd_smin{sigma_min:g}"


def likelihood_metrics(
    denoiser: torch.nn.Module, data_cfg: Any, eval_cfg: Any, sampler_cfg: Any, *, device: str | torch.device,
    dataset: Any = None, distributed: bool = False,
) -> tuple[dict[str, float], dict[str, Any]]:
    """(``{"nll_<method>_bpd": mean, "nll_<method>_bpd_sem": standard error}``, details) on ``eval.nll_num_images``
    images of the ``eval.nll_split`` split (image i: seed ``eval.seed + i``); under torchrun the images are split
    over the ranks and every rank returns the same numbers."""
    settings = eval_settings(eval_cfg)
    split = str(settings["nll_split"])
    dataset = _nll_dataset(data_cfg, split, dataset)
    method = _nll_method(settings, dataset)
    images, onehot = _nll_images(denoiser, dataset, settings["nll_num_images"])
    n = len(images)
    sampler = to_plain_dict(sampler_cfg)
    sigma_min, sigma_max = float(sampler.get("sigma_min", 0.002)), float(sampler.get("sigma_max", 80.0))
    sigma_low = None  # the ELBO from the sampler's σ_min too, when the main one starts higher
    if method == "elbo" and settings.get("nll_elbo_sigma_min") is not None:
        sigma_low = sigma_min if sigma_min < float(settings["nll_elbo_sigma_min"]) else None
        sigma_min = float(settings["nll_elbo_sigma_min"])
    first = int(settings["seed"])
    on, rank, world = rank_split(distributed)
    mine = rank_slice(n, rank, world)
    info: dict[str, Any] = {}
    part = part_low = torch.empty(0, dtype=torch.float64)
    if len(mine):
        sl = slice(mine.start, mine.stop)
        part = nll_bits_per_dim(
            denoiser, images[sl], seeds=[first + i for i in mine], method=method, sigma_min=sigma_min,
            sigma_max=sigma_max, solver=str(settings["nll_solver"]), tolerance=float(settings["nll_tolerance"]),
            num_steps=int(settings["nll_steps"]), num_probes=int(settings["nll_probes"]),
            probe=str(settings["nll_probe"]), class_labels=None if onehot is None else onehot[sl],
            batch_size=int(settings["nll_batch"] or settings["batch"]), device=device, info=info,
            elbo_sigma_min_low=sigma_low)
        part_low = info.get("low_bpd", part_low)
    bpd = gather_rows(part, on)
    rank_infos = [(info.get("nfe", 0.0), len(mine), info.get("terms_bpd"))]
    if on:
        rank_infos = all_gather_object(rank_infos[0])
    metrics = _mean_and_sem(f"nll_{method}_bpd", bpd)
    if sigma_low is not None:
        metrics.update(_mean_and_sem(elbo_key(sigma_low), gather_rows(part_low, on)))
    details = _nll_details(method, settings, split, n, (sigma_min, sigma_max), rank_infos)
    if sigma_low is not None:
        details["sigma_min_low"] = sigma_low
    return metrics, details


def _mean_and_sem(key: str, bpd: torch.Tensor) -> dict[str, float]:
    """``{key: mean}`` and, over more than one image, ``{key_sem: standard error of the mean}``."""
    out = {key: float(bpd.mean())}
    if len(bpd) > 1:
        out[key + "_sem"] = float(bpd.std() / math.sqrt(len(bpd)))
    return out


def _nll_dataset(data_cfg: Any, split: str, dataset: Any) -> Any:
    """The dataset to evaluate (``dataset``, else the ``split`` of ``data_cfg``); refuses latent data."""
    if dataset is None:
        try:
            dataset = build_dataset(data_cfg, split=split)
        except (FileNotFoundError, NotImplementedError) as err:
            raise ValueError(f"eval.nll_split={split}: {err} (eval.nll_split=train evaluates on training images)") \
                from err
    if getattr(dataset, "latent", False):
        raise ValueError(f"eval.metrics=[nll] needs pixel data; data '{dataset.name}' holds VAE latents, whose "
                         "density is not a likelihood of images")
    return dataset


def _nll_method(settings: Mapping[str, Any], dataset: Any) -> str:
    """``eval.nll_method``; ``auto``: the ELBO for binary data, the ODE otherwise."""
    method = str(settings["nll_method"])
    if method == "auto":
        method = "elbo" if getattr(dataset, "binary", False) else "ode"
    if method not in NLL_METHODS:
        raise ValueError(f"unknown eval.nll_method {method!r}; valid: auto, {', '.join(NLL_METHODS)}")
    return method


def _nll_images(denoiser: torch.nn.Module, dataset: Any, limit: Any) -> tuple[Tensor, Tensor | None]:
    """The first ``limit`` images of ``dataset`` (None: all) and, for a class-conditional model, their one-hot
    labels."""
    images = dataset.all_images()
    n = len(images) if limit is None else min(int(limit), len(images))
    if n < 1:
        raise ValueError(f"eval.nll_num_images must be >= 1, got {limit}")
    images = images[:n]
    label_dim = int(getattr(denoiser, "label_dim", 0) or 0)
    onehot = None
    if label_dim:
        labels = dataset.all_labels()[:n]
        if bool((labels < 0).any()):
            raise ValueError(f"the model is class-conditional but data '{dataset.name}' has no labels")
        onehot = torch.nn.functional.one_hot(labels, label_dim).float()
    return images, onehot


def _nll_details(method: str, settings: Mapping[str, Any], split: str, n: int, sigmas: tuple[float, float],
                 rank_infos: Sequence[tuple[float, int, Any]]) -> dict[str, Any]:
    """How the likelihood was measured; ``rank_infos``: per rank (NFE per image, images, ELBO terms)."""
    count = max(sum(b for _, b, _ in rank_infos), 1)
    nfe = sum(a * b for a, b, _ in rank_infos) / count
    first = int(settings["seed"])
    details = {
        "method": method, "measure": NLL_MEASURES[method], "split": split, "num_images": n,
        "seeds": [first, first + n - 1], "sigma_min": sigmas[0], "sigma_max": sigmas[1],
        "nfe_per_image": round(float(nfe), 2),
    }
    if method == "ode":
        details.update(solver=settings["nll_solver"], probes=int(settings["nll_probes"]), probe=settings["nll_probe"])
        details["tolerance" if settings["nll_solver"] == "rk45" else "steps"] = (
            float(settings["nll_tolerance"]) if settings["nll_solver"] == "rk45" else int(settings["nll_steps"]))
    else:
        details["strata"] = int(settings["nll_steps"])
        details["terms_bpd"] = {term: sum(t[term] * b for _, b, t in rank_infos if t) / count
                                for term in ("diffusion", "reconstruction", "prior")}
        if any(t and "diffusion_low" in t for _, _, t in rank_infos):  # the bound from the sampler's σ_min adds these
            details["terms_bpd_low"] = {term: sum(t[term] * b for _, b, t in rank_infos if t) / count
                                        for term in ("diffusion_low", "reconstruction_low")}
    return details


def format_likelihood(metrics: Mapping[str, float], details: Mapping[str, Any]) -> str:
    """One line naming the likelihood, its standard error and how it was measured."""
    key = f"nll_{details['method']}_bpd"
    sem = metrics.get(key + "_sem")
    value = f"{metrics[key]:.4f}" + (f" ± {sem:.4f}" if sem is not None else "")
    solver = (f", {details['solver']} " + (f"tol {details['tolerance']:g}" if "tolerance" in details
                                           else f"{details['steps']} steps")
              + f", {details['probes']} {details['probe']} probe(s)") if details["method"] == "ode" else (
        f", σ from {details['sigma_min']:g}, {details['strata']} strata; bits/dim: diffusion "
        f"{details['terms_bpd']['diffusion']:.4f} + decoder {details['terms_bpd']['reconstruction']:.2g} + prior "
        f"{details['terms_bpd']['prior']:.2g}")
    line = (f"likelihood: {key} = {value} bits/dim ({details['measure']}; {details['num_images']} "
            f"{details['split']} images{solver}, {details['nfe_per_image']:g} NFE/image)")
    if details.get("sigma_min_low") is not None:
        low = elbo_key(details["sigma_min_low"])
        low_sem = metrics.get(low + "_sem")
        extra = details.get("terms_bpd_low") or {}
        line += (f"; from the sampler's σ_min {details['sigma_min_low']:g}: {low} = {metrics[low]:.4f}"
                 + (f" ± {low_sem:.4f}" if low_sem is not None else "") + " bits/dim (+ diffusion below "
                 f"{details['sigma_min']:g}: {extra.get('diffusion_low', float('nan')):.4f}, decoder at "
                 f"{details['sigma_min_low']:g} in place of {details['sigma_min']:g})")
    return line
