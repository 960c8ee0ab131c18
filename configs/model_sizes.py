"""Named model sizes: what ``size:`` in a model config stands for, defined once for the networks and the configs.

DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", arXiv 2212.09748, Table 1) names a network by
its size and its patch size — DiT-XL/2 is size XL with 2x2 patches — and the size fixes the depth (transformer
blocks), the width (``hidden_size``) and the number of attention heads. ``configs/model/dit_<size><patch>.yaml``
select ``size`` and ``patch_size`` the same way; ``models.dit.DiT`` takes depth, hidden_size and num_heads from
``DIT_SIZES``, each of them overridable (``model.depth=6``).

The table lives here, below both the networks and the configs, because saved configs are compared through it:
checkpoints written before the model configs named sizes store depth, hidden_size and num_heads explicitly (and
still build the same network), and ``canonical_model_config`` makes both spellings of one network the same config,
so that resuming such a run with today's ``model=dit_b2`` is not refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from configs import to_plain_dict

#: DiT size -> (depth, hidden_size, num_heads), Peebles & Xie 2023, Table 1
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
#: the model-config fields a DiT size sets, in the order of the ``DIT_SIZES`` tuples
DIT_SIZE_FIELDS = ("depth", "hidden_size", "num_heads")


def canonical_model_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of a model config with its ``size`` spelled out.

    For a DiT (``arch: dit``) with a known ``size``, each of depth / hidden_size / num_heads that is unset (null or
    absent) takes the size's value, and ``size`` is dropped (a null ``size`` is dropped too). Any other config, or an
    unknown size (which the network itself reports), comes back unchanged.
    """
    cfg = to_plain_dict(model_cfg)
    if cfg.get("arch") != "dit" or "size" not in cfg:
        return cfg
    size = cfg["size"]
    if size is not None and size not in DIT_SIZES:
        return cfg
    del cfg["size"]
    if size is not None:
        for field, value in zip(DIT_SIZE_FIELDS, DIT_SIZES[size]):
            if cfg.get(field) is None:
                cfg[field] = value
    return cfg
