"""The sampling protocol of a model's evaluation: which seeds, how many repeats, the baselines, the training hook.

**Seeds.** Image i comes from seed ``eval.seed + i`` (per-image random streams, ``training/generate.py``), so the
result does not depend on the batch size or on the number of ranks: under ``torchrun`` each rank generates a
contiguous slice of the seeds (``evaluation/ranks.py``) and extracts their features; rank 0 gathers the features in
seed order (in bounded chunks: never the images, which stay on the rank that made them) and computes the metrics
(``evaluation/feature_metrics.py``), so 50,000 ImageNet-512 samples (39 GB) never meet in one process.
``eval.seed_repeats=R`` evaluates R disjoint seed ranges (seed + r·N .. seed + (r+1)·N − 1) and reports the one with
the **minimum FID**, listing every value: the protocol of EDM (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", arXiv 2206.00364), whose reference implementation (NVlabs/edm) evaluates seeds
0-49999, 50000-99999 and 100000-149999 (``eval=fid50k``).

**Baselines** (``eval.baselines=true``) add two reference points: the **floor**, the metric of the held-out split
against the training split (a model that generalises perfectly cannot do better, up to the bias of the smaller
sample: compare it with the ``samples@<n>`` column, the same metric on the first n samples), and the **ceiling**,
the metric of a freshly initialised (untrained) denoiser of the checkpoint's architecture sampled with the same
sampler and seeds.

**During training**: ``evaluate_during_training`` (called by train.py on rank 0 every ``eval.every_kimg``) samples
``eval.num_samples_during_training`` images and returns ``{"kimg": ..., "eval/<metric>": ...}`` for
metrics.jsonl / wandb, leaving the global RNG states and the model's mode untouched. ``preflight_during_training``
(train.py's ``preflight`` hook, at start-up) runs the evaluation's preflight (``evaluation/preflight.py``) on the
training set, so that an evaluation that cannot run stops the run before its first step, not at its first
evaluation.

**Counts beside numbers.** A metric is comparable only at equal sample counts, so every result carries the count
beside its values (``num_samples``, per column ``counts``, ``eval/num_samples`` in metrics.jsonl) and the sampling
that made the images (sampler config, ``nfe`` network evaluations per image, ``num_steps``); metric keys keep their
names (``fid_inception``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from configs import to_plain_dict
from data import build_dataset
from evaluation.feature_metrics import FeatureSet, image_features
from evaluation.features import eval_device, resolve_feature_extractor
from evaluation.likelihood import likelihood_metrics
from evaluation.metrics import compute_metrics, metrics_of_features
from evaluation.preflight import PreflightResult, check_evaluation
from evaluation.ranks import gather_rows, gather_to_main, rank_slice, rank_split
from evaluation.reference_stats import reference_identity
from evaluation.samples_file import SamplesNpzWriter
from evaluation.settings import check_metrics, eval_settings, primary_key
from training.denoiser import build_denoiser
from training.distributed import barrier, broadcast_object
from training.generate import generate_images, latent_codec_for
from training.rng import preserved_rng

__all__ = [
    "generate_for_eval",
    "floor_columns",
    "evaluate_model",
    "reference_getter",
    "evaluate_denoiser",
    "evaluate_during_training",
    "preflight_during_training",
    "PlannedEvaluation",
    "planned_evaluation",
    "evaluate_plan",
]

CEILING_NOTE = "ceiling: needs ckpt= (an untrained model of the checkpoint's architecture)"


def generate_for_eval(
    denoiser: torch.nn.Module, data_cfg: Any, eval_cfg: Any, sampler_cfg: Any, *, device: str | torch.device,
    num_samples: int | None = None, progress: bool = False, first_seed: int | None = None, distributed: bool = False,
    info: dict[str, Any] | None = None,
) -> Tensor:
    """``eval.num_samples`` uint8 images from seeds ``first_seed .. first_seed + N - 1`` (default first seed
    ``eval.seed``; labels drawn per seed). ``distributed``: under torchrun each rank generates a contiguous slice of
    the seeds and every rank returns all N images (gathered in seed order); identical to one process (every rank then
    holds all the images: the evaluation itself, ``evaluate_model``, gathers features instead). ``progress``
    (with ``eval.progress``): a progress bar on rank 0. ``info`` receives this rank's sampling facts (``nfe``,
    ``num_steps``; ``training.generate.generate_images``)."""
    settings = eval_settings(eval_cfg)
    n = int(num_samples if num_samples is not None else settings["num_samples"])
    first = int(settings["seed"] if first_seed is None else first_seed)
    images = _my_images(denoiser, data_cfg, settings, sampler_cfg, device=device, n=n, first=first,
                        distributed=distributed, progress=progress, info=info)
    return gather_rows(images, rank_split(distributed)[0])


def _my_images(denoiser: torch.nn.Module, data_cfg: Any, settings: Mapping[str, Any], sampler_cfg: Any, *,
               device: str | torch.device, n: int, first: int, distributed: bool, progress: bool = False,
               info: dict[str, Any] | None = None) -> Tensor:
    """This rank's contiguous slice of the images of seeds ``first .. first + n - 1`` (all of them without a process
    group): uint8 [n_rank, C, H, W]."""
    if n < 2:
        raise ValueError(f"eval.num_samples must be >= 2, got {n}")
    _, rank, world = rank_split(distributed)
    mine = [first + i for i in rank_slice(n, rank, world)]
    binary = bool(to_plain_dict(data_cfg).get("binarize", False))
    extra: dict[str, Any] = {}
    if getattr(denoiser, "latent_info", None):  # a latent-space model: decode its samples to RGB with its VAE
        extra["latent_codec"] = latent_codec_for(denoiser, device)
    images = torch.empty(0, dtype=torch.uint8)
    show = progress and rank == 0 and bool(settings.get("progress", True))
    if mine:
        images = generate_images(denoiser, mine, sampler_cfg=sampler_cfg, batch_size=int(settings["batch"]),
                                 device=device, binary=binary, progress=show, info=info, **extra)
    return images


def floor_columns(samples: Tensor | FeatureSet, data_cfg: Any, common: Mapping[str, Any],
                  get_reference: Callable[[], Any], notes: list[str]) -> tuple[dict[str, dict[str, float]],
                                                                             dict[str, int]]:
    """The floor (held-out split vs training split) and the same metric on as many samples (given as images or as
    their features); ``common``: ``compute_metrics``' keyword arguments."""
    columns: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    try:
        heldout = build_dataset(data_cfg, split="test")
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        notes.append(f"floor: not available ({err})")
        return columns, counts
    held_images = heldout.all_images()
    n_held = len(held_images)
    n_samples = samples.num_images if isinstance(samples, FeatureSet) else len(samples)
    if n_held < n_samples:
        key = f"samples@{n_held}"
        if isinstance(samples, FeatureSet):
            columns[key] = metrics_of_features(samples.first(n_held), get_reference(), **common)
        else:
            columns[key] = compute_metrics(samples[:n_held], get_reference(), **common)
        counts[key] = n_held
    columns["floor"] = compute_metrics(held_images, get_reference(), **common)
    counts["floor"] = n_held
    return columns, counts


@dataclasses.dataclass
class _Job:
    """What every part of one model's evaluation shares."""

    data_cfg: Any
    sampler_cfg: Any
    settings: Mapping[str, Any]
    device: str | torch.device
    get_reference: Callable[[], Any]
    common: dict[str, Any]  # compute_metrics' keyword arguments
    distributed: bool
    main: bool
    num_samples: int
    progress: bool = False
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)  # nfe, num_steps of the first seed range
    samples_path: Any = None  # eval.save_samples: where the first seed range's images go (.npz)

    def features(self, images: Tensor) -> FeatureSet | None:
        """The features of this rank's images; every rank's, in seed order, on rank 0 (None on the others)."""
        local = image_features(images, self.common["metrics"], self.common["feature_extractor"],
                               settings=self.settings, data_cfg=self.data_cfg, device=self.device,
                               progress="features (samples)" if self.progress and self.main else None)
        return local.gather(self.distributed)

    def metrics_of(self, features: FeatureSet) -> dict[str, float]:
        return metrics_of_features(features, self.get_reference(), progress=self.progress, **self.common)


def evaluate_model(
    denoiser: torch.nn.Module, data_cfg: Any, sampler_cfg: Any, settings: Mapping[str, Any], *,
    device: str | torch.device, get_reference: Callable[[], Any], distributed: bool = False, progress: bool = False,
    run_cfg: Any = None, num_samples: int | None = None, samples_path: str | os.PathLike | None = None,
) -> dict[str, Any] | None:
    """Sample (every seed repeat), compute ``eval.metrics`` and, with ``eval.baselines``, floor and ceiling.

    All ranks must call it (sampling, feature extraction and NLL are split over them; rank 0 receives the features,
    never the images); rank 0 gets the result, the others None. ``get_reference()`` returns the training split (or
    None with ``eval.reference_stats``); ``run_cfg`` (the run's config) is needed for the ceiling. With
    ``eval.save_samples`` and ``samples_path``, the first seed range's images are streamed to that ``.npz``
    (``evaluation/samples_file.py``; the result's ``samples_file``).
    """
    metrics = check_metrics(settings["metrics"])
    sample_metrics = [m for m in metrics if m != "nll"]
    on, rank, _ = rank_split(distributed)
    repeats_n = int(settings["seed_repeats"])
    if repeats_n < 1:
        raise ValueError(f"eval.seed_repeats must be >= 1, got {repeats_n}")
    extractor = resolve_feature_extractor(settings["feature_extractor"], data_cfg) if sample_metrics else None
    common = dict(metrics=sample_metrics, feature_extractor=extractor,
                  reference_cache_name=reference_identity(data_cfg, "train"), eval_cfg=settings, data_cfg=data_cfg,
                  device=device)
    job = _Job(data_cfg, sampler_cfg, settings, device, get_reference, common, on, rank == 0,
               int(num_samples if num_samples is not None else settings["num_samples"]),
               progress=progress and bool(settings.get("progress", True)),
               samples_path=samples_path if settings.get("save_samples") else None)
    repeats, first_features = _sample_repeats(job, denoiser, repeats_n if sample_metrics else 0, progress)
    nll_metrics: dict[str, float] = {}
    nll_details = None
    if "nll" in metrics:
        nll_metrics, nll_details = likelihood_metrics(denoiser, data_cfg, settings, sampler_cfg, device=device,
                                                      distributed=on)
    ceiling = None
    if settings["baselines"] and sample_metrics and run_cfg is not None:
        ceiling = _ceiling(job, denoiser, run_cfg)
    if not job.main:
        return None
    columns, counts, notes, best = _repeat_columns(repeats)
    if repeats and settings["baselines"]:
        floor_cols, floor_counts = floor_columns(first_features, data_cfg, common, get_reference, notes)
        columns.update(floor_cols)
        counts.update(floor_counts)
        if ceiling is not None:
            columns["ceiling"], counts["ceiling"] = ceiling
        else:
            notes.append(CEILING_NOTE)
    return {
        "metrics": {**(repeats[best]["metrics"] if repeats else {}), **nll_metrics},
        "extractor": extractor,
        "repeats": repeats,
        "best_repeat": best,
        "columns": columns,
        "counts": counts,
        "notes": notes,
        "likelihood": nll_details,
        "images": None,  # the images stay where they were made; eval.save_samples streams them to samples_file
        "samples_file": str(job.samples_path) if job.samples_path is not None and repeats else None,
        "num_samples": repeats[best]["num_images"] if repeats else 0,
        "seeds": repeats[best]["seeds"] if repeats else None,
        "nfe": job.sampling.get("nfe"),
        "num_steps": job.sampling.get("num_steps"),
    }


def _sample_repeats(job: _Job, denoiser: torch.nn.Module, repeats_n: int,
                    progress: bool) -> tuple[list[dict[str, Any]], FeatureSet | None]:
    """Every seed range's metrics (on rank 0; every rank samples and extracts the features of its share), and the
    first range's features."""
    n, seed = job.num_samples, int(job.settings["seed"])
    repeats: list[dict[str, Any]] = []
    first_features = None
    for r in range(repeats_n):
        first = seed + r * n
        if job.main and progress:
            sampler = to_plain_dict(job.sampler_cfg)
            print(f"generating {n} samples (seeds {first}-{first + n - 1}) with sampler={sampler.get('name')} "
                  f"num_steps={sampler.get('num_steps')} on {job.device}", flush=True)
        info: dict[str, Any] = {}
        images = _my_images(denoiser, job.data_cfg, job.settings, job.sampler_cfg, device=job.device, n=n,
                            first=first, distributed=job.distributed, progress=progress, info=info)
        if r == 0 and info:
            job.sampling = {"nfe": info["nfe"], "num_steps": info["num_steps"]}
        if r == 0 and job.samples_path is not None:
            _save_samples(job, images, first, n)
        features = job.features(images)
        del images
        if job.main:
            repeats.append({"seeds": [first, first + n - 1], "num_images": features.num_images,
                            "metrics": job.metrics_of(features)})
            if r == 0:
                first_features = features
    return repeats, first_features


def _save_samples(job: _Job, images: Tensor, first: int, n: int) -> None:
    """Stream every rank's images of seeds ``first ..`` to ``job.samples_path`` in seed order (rank 0 writes, one
    chunk in memory at a time)."""
    writer = None
    if job.main:
        writer = SamplesNpzWriter(job.samples_path, np.arange(first, first + n), tuple(images.shape[1:]))
    gather_to_main(images, job.distributed, sink=writer.write if writer is not None else None)
    if writer is not None:
        print(f"wrote {writer.close()}", flush=True)


def _ceiling(job: _Job, denoiser: torch.nn.Module, run_cfg: Any) -> tuple[dict[str, float], int] | None:
    """The metrics of an untrained denoiser of ``denoiser``'s architecture (initialised with seed ``eval.seed``),
    sampled with the same sampler and seeds; None on the ranks other than 0."""
    seed = int(job.settings["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = build_denoiser(run_cfg, denoiser.img_resolution, denoiser.img_channels,
                               label_dim=int(getattr(denoiser, "label_dim", 0)),
                               augment_dim=int(getattr(denoiser, "augment_dim", 0)),
                               latent_info=getattr(denoiser, "latent_info", None))
    fresh = fresh.eval().requires_grad_(False).to(job.device)
    untrained = _my_images(fresh, job.data_cfg, job.settings, job.sampler_cfg, device=job.device, n=job.num_samples,
                           first=seed, distributed=job.distributed)
    features = job.features(untrained)
    return (job.metrics_of(features), features.num_images) if job.main else None


def _repeat_columns(repeats: list[dict[str, Any]]
                    ) -> tuple[dict[str, dict[str, float]], dict[str, int], list[str], int]:
    """(columns, image counts, notes, index of the reported repeat): one column per seed range and, with several,
    the best one (minimum FID, as EDM reports)."""
    columns: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    notes: list[str] = []
    if not repeats:
        return columns, counts, notes, 0
    key, lower = primary_key(repeats[0]["metrics"])
    values = [rep["metrics"][key] for rep in repeats]
    best = int(np.argmin(values) if lower else np.argmax(values))
    if len(repeats) == 1:
        columns["samples"], counts["samples"] = repeats[0]["metrics"], repeats[0]["num_images"]
        return columns, counts, notes, best
    for rep in repeats:
        name = f"seeds {rep['seeds'][0]}-{rep['seeds'][1]}"
        columns[name], counts[name] = rep["metrics"], rep["num_images"]
    name = f"{'min' if lower else 'max'} of {len(repeats)}"
    columns[name], counts[name] = repeats[best]["metrics"], repeats[best]["num_images"]
    notes.append(f"reported: the {'minimum' if lower else 'maximum'} {key} over {len(repeats)} seed ranges "
                 f"(EDM's protocol): seeds {repeats[best]['seeds'][0]}-{repeats[best]['seeds'][1]}")
    return columns, counts, notes, best


def reference_getter(data_cfg: Any, settings: Mapping[str, Any], reference: Any = None) -> Callable[[], Any]:
    """A memoised ``() -> training split`` (None when ``eval.reference_stats`` replaces it)."""
    memo: dict[str, Any] = {"ref": reference}

    def get() -> Any:
        if settings.get("reference_stats") is not None:
            return None
        if memo["ref"] is None:
            reference = build_dataset(data_cfg, split="train")
            if getattr(reference, "latent", False):
                raise ValueError(
                    f"data '{reference.name}' holds VAE latents, not images: sample metrics of a latent-space model "
                    "need pixel reference statistics, e.g. eval.reference_stats=VIRTUAL_imagenet256_labeled.npz "
                    "(ADM's reference batch) or the output of `python evaluate.py ref=true data=<the pixel dataset>`")
            memo["ref"] = reference
        return memo["ref"]

    return get


@dataclasses.dataclass
class PlannedEvaluation:
    """What every directory-wide evaluation (``run_dir=`` curves, ``ema_sweep=``) shares: the evaluation settings
    (no floor/ceiling columns), the device, whether this is rank 0 and whether ranks split the sampling."""
    settings: dict[str, Any]
    device: torch.device
    main: bool
    distributed: bool


def planned_evaluation(cfg: Any, dist_info: Any = None) -> PlannedEvaluation:
    settings = eval_settings(cfg.eval)
    settings["baselines"] = False
    check_metrics(settings["metrics"])
    device = dist_info.device if dist_info is not None else eval_device(str(cfg.get("device", "auto")))
    return PlannedEvaluation(settings, device, dist_info is None or dist_info.rank == 0, dist_info is not None)


def evaluate_plan(plan: Sequence[Mapping[str, Any]], ctx: PlannedEvaluation,
                  describe: Callable[[Mapping[str, Any], Sequence[Any]], str],
                  evaluate: Callable[[Mapping[str, Any], Sequence[Any], Callable[[], Any]], None]) -> None:
    """Evaluate each planned run's ``todo`` (rank 0's plan, broadcast so every rank does the same work): print
    ``describe(item, todo)`` on rank 0, then ``evaluate(item, todo, get_reference)``; the reference split is built
    once per distinct data set. Ends with a barrier."""
    todos = broadcast_object([item["todo"] for item in plan])
    references: dict[str, Any] = {}
    for item, todo in zip(plan, todos):
        if ctx.main:
            print(describe(item, todo), flush=True)
        ident = reference_identity(item["data"], "train")
        if ident not in references:
            references[ident] = reference_getter(item["data"], ctx.settings)
        evaluate(item, todo, references[ident])
    barrier()


def evaluate_denoiser(
    denoiser: torch.nn.Module, data_cfg: Any, eval_cfg: Any, sampler_cfg: Any, *, device: str | torch.device,
    num_samples: int | None = None, reference: Any = None, distributed: bool = False,
) -> dict[str, float]:
    """Sample ``eval.num_samples`` images and compute ``eval.metrics`` (``nll`` included) against the training split
    of ``data_cfg`` (or ``eval.reference_stats``); with ``eval.seed_repeats`` > 1 the best repeat's values.

    ``reference`` may pass a prebuilt training dataset. ``distributed=True``: every rank calls it and shares the
    sampling; rank 0 gets the metrics, the other ranks ``{}``.
    """
    settings = eval_settings(eval_cfg)
    settings["baselines"] = False
    result = evaluate_model(denoiser, data_cfg, sampler_cfg, settings, device=device, num_samples=num_samples,
                            get_reference=reference_getter(data_cfg, settings, reference), distributed=distributed)
    return {} if result is None else result["metrics"]


def _training_settings(cfg: Any) -> tuple[dict[str, Any], int]:
    """The ``eval`` settings of an evaluation during training (one seed range, no baselines) and its sample count."""
    settings = eval_settings(cfg.eval)
    n = int(settings["num_samples_during_training"] or settings["num_samples"])
    settings.update(seed_repeats=1, baselines=False)
    return settings, n


def _refuse_latents(dataset: Any) -> None:
    if getattr(dataset, "latent", False):
        raise ValueError("evaluation during training needs pixel data; the training set holds latents (set "
                         "eval.every_kimg=null, and evaluate decoded samples with sample.py + evaluate.py samples=)")


def preflight_during_training(cfg: Any, dataset: Any) -> PreflightResult:
    """train.py's ``preflight`` hook (rank 0, at start-up, when ``eval.every_kimg`` is set): the checks of
    ``evaluation/preflight.py`` for ``evaluate_during_training`` on ``dataset`` (the training split), e.g. the
    Inception weights are found (or downloaded) now, and latent data is refused now rather than hours in."""
    _refuse_latents(dataset)
    settings, n = _training_settings(cfg)
    shape = (int(dataset.num_channels), int(dataset.resolution), int(dataset.resolution))
    return check_evaluation(settings, cfg.data, get_reference=lambda: dataset, chw=shape, num_samples=n)


def evaluate_during_training(ema_denoiser: torch.nn.Module, cfg: Any, dataset: Any, device: str | torch.device,
                             cur_kimg: float) -> dict[str, Any]:
    """Periodic evaluation for train.py (rank 0, every ``eval.every_kimg``): ``eval.metrics`` of
    ``eval.num_samples_during_training`` samples (seeds ``eval.seed``.., one repeat, no baselines) against
    ``dataset`` (the training split), with ``cfg.data`` and ``cfg.sampler``.

    Returns ``{"kimg": cur_kimg, "eval/<metric key>": value, ..., "eval/num_samples": N, "eval/seed": first seed,
    "eval/nfe": network evaluations per image, "eval/seconds": s}`` ready for metrics.jsonl / wandb. The model's
    train/eval mode and every global RNG state are restored, so a resumed run is not perturbed by when it was
    evaluated.
    """
    _refuse_latents(dataset)
    settings, n = _training_settings(cfg)
    t0 = time.time()
    was_training = ema_denoiser.training
    with preserved_rng(device):
        ema_denoiser.eval()
        try:
            result = evaluate_model(ema_denoiser, cfg.data, cfg.sampler, settings, device=device, num_samples=n,
                                    get_reference=reference_getter(cfg.data, settings, dataset), progress=True)
        finally:
            ema_denoiser.train(was_training)
    assert result is not None  # a single process: rank 0
    return {"kimg": float(cur_kimg), **{f"eval/{k}": v for k, v in result["metrics"].items()},
            "eval/num_samples": n, "eval/seed": int(settings["seed"]), "eval/nfe": result["nfe"],
            "eval/seconds": round(time.time() - t0, 2)}
