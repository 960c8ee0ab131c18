"""Python side of the Hydra configuration: turning config groups into objects, and checking them.

Every group that selects an implementation has a registry: a plain dict ``{implementation name: factory}`` next to
the implementations (``models.ARCHITECTURES``, ``data.SOURCES``, ``diffusion.schedules.SCHEDULES``,
``diffusion.weighting.WEIGHTINGS``, ``diffusion.preconditioning.PRECONDITIONERS``, ``diffusion.samplers.SAMPLERS``).
A config names its implementation with a selector key — ``arch`` for models, ``source`` for data, ``name`` for the
others (the keys checkpoints store) — and ``build_from_registry`` builds it, passing the remaining keys as keyword
arguments. All groups go through it (samplers, which are functions rather than objects to build, through
``registry_choice``), so an unknown choice or an unknown / missing parameter fails with one message format that names
the field, the bad value and the valid choices: ``unknown model.arch 'x'; valid choices: dhariwalunet, dit, ...``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Collection, Mapping
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


def check_kwargs(group: str, option: str, factory: Any, kwargs: Mapping[str, Any],
                 supplied: Collection[str] = ()) -> None:
    """Raise a clear error if ``kwargs`` has keys ``factory`` does not accept, or lacks required ones.

    ``supplied`` names the arguments the code passes itself: they are not listed as valid config parameters.
    """
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        valid = ", ".join(n for n in accepted if n not in supplied) or "none"
        raise ValueError(f"{group}={option}: unknown parameter(s) {', '.join(unknown)}; valid parameters: {valid}")
    missing = [
        n for n in accepted if params[n].default is inspect.Parameter.empty and n not in kwargs
    ]
    if missing:
        raise ValueError(f"{group}={option}: missing required parameter(s) {', '.join(missing)}")


def accepted_parameters(factory: Any) -> set[str]:
    """Names of the keyword arguments ``factory`` accepts."""
    params = inspect.signature(factory).parameters
    return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"}


def registry_choice(group: str, registry: Mapping[str, Any], cfg: Mapping[str, Any], key: str = "name") -> str:
    """The entry of ``registry`` that ``cfg[key]`` selects, or the common error naming the field and the choices.

    The field is the group itself for ``key="name"`` (``schedule=nope``), else ``<group>.<key>`` (``model.arch``).
    """
    valid = ", ".join(sorted(registry))
    if key not in cfg:
        name = cfg.get("name")
        label = f" '{name}'" if name is not None and key != "name" else ""
        raise ValueError(f"{group} config{label} has no '{key}' key; valid choices: {valid}")
    choice = cfg[key]
    if choice not in registry:
        field = group if key == "name" else f"{group}.{key}"
        raise ValueError(f"unknown {field} '{choice}'; valid choices: {valid}")
    return choice


def build_from_registry(group: str, registry: Mapping[str, Any], cfg: Any, key: str = "name",
                        drop: tuple[str, ...] = ("name",), context: Mapping[str, Any] | None = None,
                        whole_config: bool = False, **extra: Any) -> Any:
    """Instantiate ``registry[cfg[key]]`` with the config's other keys (minus ``drop``) plus ``extra``.

    ``extra`` holds the arguments the code supplies (the network of a preconditioner, the data geometry of a
    network); they are not config parameters. ``context`` holds run facts some implementations need and others don't
    (the loss weighting, the image resolution, ...): each entry is passed only if the factory has a parameter of that
    name, and never overrides a value given in the config. With ``whole_config`` the factory is called as
    ``factory(config, **extra)`` with the whole plain config instead, for factories that read their own keys (the
    data sources).
    """
    kwargs = to_plain_dict(cfg)
    choice = registry_choice(group, registry, kwargs, key)
    factory = registry[choice]
    if whole_config:
        return factory(kwargs, **extra)
    option = str(kwargs.get("name") or choice)
    for k in drop:
        kwargs.pop(k, None)
    kwargs.update(extra)
    check_kwargs(group, option, factory, kwargs, supplied=tuple(extra))
    if context:
        wanted = accepted_parameters(factory)
        for k, v in context.items():
            if k in wanted and kwargs.get(k) is None:
                kwargs[k] = v
    return factory(**kwargs)
