"""Python side of the Hydra configuration: turning config groups into objects, and checking them.

Every config group option (``configs/<group>/<option>.yaml``) has a ``name`` (and, for models, an ``arch``); the code
picks the implementation from a small registry keyed by that name, and passes the remaining keys as keyword arguments.
``build_from_registry`` does this once for all groups, so that an unknown option or an unknown / missing parameter
fails with a message that names the group, the bad key and the valid choices.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf


def to_plain_dict(cfg: Any) -> dict[str, Any]:
    """A resolved, plain-``dict`` copy of a DictConfig (or mapping); ``None`` gives ``{}``."""
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return dict(OmegaConf.to_container(cfg, resolve=True))
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"expected a config mapping, got {type(cfg).__name__}")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; an empty mapping is kept as a leaf value."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, Mapping) and (node or not prefix):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def jsonable(value: Any) -> Any:
    """Plain, strict JSON values: non-finite floats (e.g. ``sampler.S_max = inf``) become the strings 'inf' / '-inf' /
    'nan', tuples lists, and unknown objects their ``str()``."""
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def check_kwargs(group: str, option: str, factory: Any, kwargs: Mapping[str, Any]) -> None:
    """Raise a clear error if ``kwargs`` has keys ``factory`` does not accept, or lacks required ones."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"{group}={option}: unknown parameter(s) {', '.join(unknown)}; valid parameters: {', '.join(accepted)}"
        )
    missing = [
        n for n in accepted if params[n].default is inspect.Parameter.empty and n not in kwargs
    ]
    if missing:
        raise ValueError(f"{group}={option}: missing required parameter(s) {', '.join(missing)}")


def accepted_parameters(factory: Any) -> set[str]:
    """Names of the keyword arguments ``factory`` accepts."""
    params = inspect.signature(factory).parameters
    return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"}


def build_from_registry(group: str, registry: Mapping[str, Any], cfg: Any, key: str = "name",
                        drop: tuple[str, ...] = ("name",), context: Mapping[str, Any] | None = None,
                        **extra: Any) -> Any:
    """Instantiate ``registry[cfg[key]]`` with the config's other keys (minus ``drop``) plus ``extra``.

    ``context`` holds run facts some implementations need and others don't (the loss weighting, the image
    resolution, ...): each entry is passed only if the factory has a parameter of that name, and never overrides a
    value given in the config.
    """
    kwargs = to_plain_dict(cfg)
    choice = kwargs.get(key)
    if choice not in registry:
        raise ValueError(f"unknown {group} {key} '{choice}'; valid choices: {', '.join(sorted(registry))}")
    for k in drop:
        kwargs.pop(k, None)
    kwargs.update(extra)
    factory = registry[choice]
    check_kwargs(group, str(choice), factory, kwargs)
    if context:
        wanted = accepted_parameters(factory)
        for k, v in context.items():
            if k in wanted and kwargs.get(k) is None:
                kwargs[k] = v
    return factory(**kwargs)
