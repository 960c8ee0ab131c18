"""Start-up checks of a training config: every bad value fails here, with one line naming the field and what is
valid, before any data is read or any model is built.

The group options themselves (unknown schedule / model / sampler names, unknown parameters) are checked by the
registries when they are built (``configs.build_from_registry``); this module checks the values of ``train.*`` and the
relations between groups.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from configs import flatten, to_plain_dict
from configs.model_sizes import canonical_model_config

# Fields that define what is being trained. Resuming a checkpoint whose values differ in any of these would silently
# continue a different experiment, so ``config_differences`` reports them.
RESUME_MUST_MATCH = ("model", "data", "precond", "schedule", "weighting", "seed", "train.batch", "train.lr",
                     "train.betas", "train.eps", "train.weight_decay", "train.label_dropout", "train.ema_halflife_kimg",
                     "train.ema_rampup_ratio", "train.lr_rampup_kimg", "train.grad_clip", "train.lr_schedule",
                     "train.lr_ref_kimg", "train.ema", "train.ema_sigma_rels", "train.sigma_draw")

# Where the data lies, not what it is: never compared on resume, so moving a dataset (to node-local disk, another
# mount) does not block it. ``config_differences`` also skips any data key whose value embeds data.path.
LOCATION_KEYS = ("data.path", "data.test_path", "data.prepare_cmd", "data.vae")

# Keys added after checkpoints were first written: a saved config without them had these values.
RESUME_DEFAULTS = {"train.lr_schedule": "constant", "train.lr_ref_kimg": None, "train.ema": "halflife",
                   "train.sigma_draw": "iid"}
# Keys that only matter under another key's value: (key, the key it depends on, the values that use it).
_RESUME_ONLY_WHEN = (("train.lr_ref_kimg", "train.lr_schedule", ("edm2_inv_sqrt",)),
                     ("train.ema_sigma_rels", "train.ema", ("power",)),
                     ("train.ema_halflife_kimg", "train.ema", ("halflife",)),
                     ("train.ema_rampup_ratio", "train.ema", ("halflife",)))
LR_SCHEDULES = ("constant", "edm2_inv_sqrt")
EMA_KINDS = ("halflife", "power")
SNAPSHOT_DTYPES = ("fp16", "bf16", "fp32")
NONFINITE_MODES = ("stop", "skip", "zero")
SIGMA_DRAWS = ("iid", "stratified")  # diffusion.schedules.SIGMA_DRAWS


VALID_METRICS = ("fid", "isc", "kid", "prc", "fd_dinov2", "nll")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field}: {message}")


def _positive_number(cfg: Any, field: str, allow_zero: bool = False, allow_null: bool = False) -> None:
    value = _get(cfg, field)
    if value is None and allow_null:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    bound = ">= 0" if allow_zero else "> 0"
    _require(ok, field, f"must be a finite number {bound}{' or null' if allow_null else ''}, got {value!r}")


def validate_train_config(cfg: Any, world_size: int = 1) -> None:
    """Raise ``ConfigError`` on the first value that cannot work."""
    t = cfg.train
    _positive_number(cfg, "train.total_kimg")
    batch = t.batch
    _require(isinstance(batch, int) and batch > 0, "train.batch", f"must be a positive integer, got {batch!r}")
    _require(batch % world_size == 0, "train.batch",
             f"{batch} is not divisible by the number of processes ({world_size})")
    per_rank = batch // world_size
    if t.batch_gpu is not None:
        bg = t.batch_gpu
        _require(isinstance(bg, int) and bg > 0, "train.batch_gpu", f"must be a positive integer or null, got {bg!r}")
        _require(per_rank % bg == 0, "train.batch_gpu",
                 f"{bg} must divide the per-process batch {per_rank} (train.batch={batch} over {world_size} "
                 "process(es)) so that gradient accumulation covers it exactly")
    _positive_number(cfg, "train.lr")
    _positive_number(cfg, "train.lr_rampup_kimg", allow_zero=True)
    betas = list(t.betas)
    _require(len(betas) == 2 and all(0 <= b < 1 for b in betas), "train.betas",
             f"must be two numbers in [0, 1), got {betas}")
    _positive_number(cfg, "train.eps")
    _positive_number(cfg, "train.weight_decay", allow_zero=True)
    _positive_number(cfg, "train.grad_clip", allow_null=True)
    _positive_number(cfg, "train.ema_halflife_kimg", allow_zero=True)
    _positive_number(cfg, "train.ema_rampup_ratio", allow_null=True)
    _validate_edm2_train_keys(cfg)
    draw = t.get("sigma_draw", "iid")
    _require(draw in SIGMA_DRAWS, "train.sigma_draw", f"must be one of {', '.join(SIGMA_DRAWS)}, got {draw!r}")
    p = t.label_dropout
    _require(isinstance(p, (int, float)) and 0 <= p < 1, "train.label_dropout", f"must be in [0, 1), got {p!r}")
    _require(p == 0 or bool(cfg.data.get("cond", False)), "train.label_dropout",
             "label dropout needs a class-conditional model: set data.cond=true (or train.label_dropout=0)")
    nw = t.num_workers
    _require(nw == "auto" or (isinstance(nw, int) and not isinstance(nw, bool) and nw >= 0), "train.num_workers",
             f"must be 'auto' or an integer >= 0, got {nw!r}")
    for field in ("train.tick_kimg",):
        _positive_number(cfg, field)
    for field in ("train.snapshot_kimg", "train.checkpoint_kimg"):
        _positive_number(cfg, field, allow_zero=True)
    k = t.keep_checkpoints
    _require(isinstance(k, int) and k >= 0, "train.keep_checkpoints", f"must be an integer >= 0, got {k!r}")
    g = t.grid_seeds
    _require(isinstance(g, int) and g >= 0, "train.grid_seeds", f"must be an integer >= 0, got {g!r}")
    metrics = list(cfg.eval.get("metrics", []) or [])
    bad = [m for m in metrics if m not in VALID_METRICS]
    _require(not bad, "eval.metrics",
             f"unknown metric(s) {', '.join(map(str, bad))}; valid: {', '.join(VALID_METRICS)}")
    _positive_number(cfg, "eval.every_kimg", allow_null=True)
    logger = cfg.logger
    _require(logger.name in ("local", "wandb"), "logger",
             f"unknown logger {logger.name!r}; valid choices: local, wandb")
    if logger.name == "wandb":
        _require(logger.mode in ("online", "offline", "disabled"), "logger.mode",
                 f"must be online, offline or disabled, got {logger.mode!r}")
    _require(not (cfg.schedule.name == "infonoise" and cfg.weighting.name == "importance"), "weighting",
             "weighting=importance cannot be combined with schedule=infonoise: InfoNoise divides its density by the "
             "loss weight, which would then depend on that density; use another weighting")
    resume = cfg.resume
    _require(resume is None or isinstance(resume, str), "resume",
             f"must be null, 'auto' or a path to a checkpoint / run directory, got {resume!r}")


def _validate_edm2_train_keys(cfg: Any) -> None:
    """The learning-rate schedule, the EMA kind and its post-hoc keys, and the non-finite mode."""
    t = cfg.train
    schedule = t.get("lr_schedule", "constant")
    _require(schedule in LR_SCHEDULES, "train.lr_schedule",
             f"unknown schedule {schedule!r}; valid choices: {', '.join(LR_SCHEDULES)}")
    if schedule == "edm2_inv_sqrt":
        _require(t.get("lr_ref_kimg") is not None, "train.lr_ref_kimg",
                 "train.lr_schedule=edm2_inv_sqrt needs t_ref in kimg (EDM2: decay batches x batch / 1000, "
                 "e.g. 143360 at img512)")
        _positive_number(cfg, "train.lr_ref_kimg")
    kind = t.get("ema", "halflife")
    _require(kind in EMA_KINDS, "train.ema", f"unknown EMA {kind!r}; valid choices: {', '.join(EMA_KINDS)}")
    if kind == "power":
        rels = t.get("ema_sigma_rels")
        ok = rels is not None and len(rels) > 0 and all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < 0.3003 for s in rels)
        _require(ok and len(set(rels)) == len(rels), "train.ema_sigma_rels",
                 f"must be a list of distinct σ_rel in (0, 0.3003) (EDM2: [0.05, 0.10]), got {rels!r}")
        _positive_number(cfg, "train.ema_snapshot_kimg", allow_zero=True)
        dtype = t.get("ema_snapshot_dtype", "fp16")
        _require(dtype in SNAPSHOT_DTYPES, "train.ema_snapshot_dtype",
                 f"must be one of {', '.join(SNAPSHOT_DTYPES)}, got {dtype!r}")
    mode = t.get("nonfinite", "stop")
    _require(mode in NONFINITE_MODES, "train.nonfinite",
             f"must be one of {', '.join(NONFINITE_MODES)}, got {mode!r}")
    target = (cfg.weighting.get("target") or {}) if cfg.weighting.name == "importance" else {}
    _require(target.get("name") != "edm2_uncertainty", "weighting.target",
             "edm2_uncertainty is a learned weight, not a target to reweight; use weighting=edm2_uncertainty")


def _resume_view(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened config as resuming compares it: keys added later take their old default when absent, and keys
    that the config does not use (``train.lr_ref_kimg`` without the inverse-sqrt decay, ...) are left out."""
    view = {**{k: v for k, v in RESUME_DEFAULTS.items() if k not in flat}, **_schedule_resume_view(flat)}
    for key, parent, values in _RESUME_ONLY_WHEN:
        if view.get(parent, RESUME_DEFAULTS.get(parent)) not in values:
            view = {k: v for k, v in view.items() if not (k == key or k.startswith(key + "."))}
    return view


def _schedule_resume_view(flat: dict[str, Any]) -> dict[str, Any]:
    """The schedule keys of a flattened config in today's spelling, as a config saved before them meant them: the
    older ``sigma_min``/``sigma_max`` as ``sigma_range`` (both null: null), no ``snr_reference`` as ``unit``, and no
    ``cosine_shifted`` ``resolution`` as the resolution the network saw (what the shift was computed from; the pixel
    resolution is the default now). The descriptive ``unverified`` lists are not compared."""
    view = {k: v for k, v in flat.items() if not (k.startswith("schedule.") and k.endswith(".unverified"))}
    for node in ("schedule", "schedule.base"):
        if f"{node}.name" not in view:
            continue
        lo, hi = view.pop(f"{node}.sigma_min", None), view.pop(f"{node}.sigma_max", None)
        if f"{node}.sigma_range" not in view:
            view[f"{node}.sigma_range"] = None if lo is None and hi is None else [lo, hi]
        view.setdefault(f"{node}.snr_reference", "unit")
        if view[f"{node}.name"] == "cosine_shifted" and f"{node}.resolution" not in view:
            latent = any(k.startswith("data.latent_") for k in view)
            view[f"{node}.resolution"] = view.get("data.resolution") if latent else None
    return view


def _with_canonical_model(cfg: Any) -> Any:
    """``cfg`` with its model config in the canonical spelling (``configs.model_sizes.canonical_model_config``)."""
    plain = to_plain_dict(cfg)
    if isinstance(plain.get("model"), Mapping):
        plain["model"] = canonical_model_config(plain["model"])
    return plain


def location_keys(*flat_configs: Mapping[str, Any]) -> set[str]:
    """The flattened ``data.*`` keys that say where data lies rather than what it is: ``LOCATION_KEYS`` and every
    ``data.*`` string that embeds a config's ``data.path`` as a whole word (a resolved ``prepare_cmd`` such as
    ``... --dest /scratch/imagenet-64x64``)."""
    keys = set(LOCATION_KEYS)
    for flat in flat_configs:
        path = flat.get("data.path")
        if not isinstance(path, str) or not path or path == "???":
            continue
        word = re.compile(r"(?:^|[\s='\"])" + re.escape(path) + r"(?:$|[\s'\"/])")
        keys |= {k for k, v in flat.items() if k.startswith("data.") and isinstance(v, str) and word.search(v)}
    return keys


def config_differences(saved: dict, current: dict, fields: tuple[str, ...] = RESUME_MUST_MATCH,
                       ignore: tuple[str, ...] = LOCATION_KEYS) -> list[str]:
    """Human-readable 'field: saved -> current' lines for the ``fields`` (and their sub-keys) that differ.

    Model configs are compared in their canonical spelling, so a DiT saved with explicit depth / hidden_size /
    num_heads matches the same network selected by ``size``. Where the data lies is not compared (``ignore`` and
    ``location_keys``): a run resumes after its dataset moved, e.g. to node-local disk.
    """
    flat_saved = _resume_view(flatten(_with_canonical_model(saved)))
    flat_current = _resume_view(flatten(_with_canonical_model(current)))
    skip = set(ignore) | location_keys(flat_saved, flat_current)
    diffs = []
    for key in sorted(set(flat_saved) | set(flat_current)):
        if not any(key == f or key.startswith(f + ".") for f in fields) or key in skip:
            continue
        a, b = flat_saved.get(key, "<absent>"), flat_current.get(key, "<absent>")
        if a != b:
            diffs.append(f"{key}: {a!r} (checkpoint) != {b!r} (now)")
    return diffs
