"""The model zoo: `create("densenet100_k12")` or `create("densenet_bc:depth=40,growth=12")`.

A name is a zoo preset (`list_models()`) or a family (`densenet_bc`, `pyramidnet`, `pyramidskipnet`,
`wrn`), optionally followed by `:key=value,...` option overrides (values are int, float or true/false).
Every created model carries `model.micronet_spec` = {"name", "family", "num_classes", "kwargs"}:
`create(spec["name"], num_classes=spec["num_classes"])` rebuilds the same architecture, and `kwargs`
holds every resolved family option.
"""

from __future__ import annotations

import functools
from typing import Any

import torch.nn as nn

from micronet.collector import collector_paused
from micronet.errors import MicronetError
from micronet.models import densenet, pyramidnet, pyramidskipnet, shakeshake, wrn  # noqa: F401  (registers the families)
from micronet.models.densenet import DenseNet
from micronet.models.gates import GatedNetwork, GateStats, is_gated
from micronet.models.pyramidnet import PyramidNet
from micronet.models.pyramidskipnet import PyramidSkipNet
from micronet.models.registry import coerce_option, families, register_family, register_model, resolve, zoo
from micronet.models.shakedrop import ShakeDrop
from micronet.models.shakeshake import ShakeShakeNet
from micronet.models.summary import build_for_sizing, count_params, dense_macs, forward_macs, macs_by_module
from micronet.models.wrn import WideResNet

__all__ = [
    "DenseNet", "GateStats", "GatedNetwork", "PyramidNet", "PyramidSkipNet", "ShakeDrop", "ShakeShakeNet",
    "WideResNet", "count_params", "create", "dense_macs", "describe_models", "is_gated", "list_families",
    "list_models", "macs_by_module", "parse_spec", "register_family", "register_model",
]

def list_models() -> list[str]:
    """Names of the zoo presets, in registration order."""
    return list(zoo())


def list_families() -> list[str]:
    """Names of the model families usable as `FAMILY:key=value,...`."""
    return list(families())


def _valid_names() -> str:
    return (f"valid names: {', '.join(list_models())}, or FAMILY[:key=value,...] with FAMILY one of "
            f"{', '.join(list_families())}")


def _parse_value(text: str) -> int | float | bool:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    raise MicronetError(f"model option value {text!r} is not an int, a float or true/false")


def parse_spec(spec: str) -> tuple[str, dict[str, int | float | bool]]:
    """Split `NAME[:key=value,...]` into the name and its typed options (syntax only, names unchecked)."""
    name, _, options = spec.strip().partition(":")
    kwargs: dict[str, int | float | bool] = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise MicronetError(f"bad model option {item!r} in {spec!r}: expected key=value")
        if key in kwargs:
            raise MicronetError(f"model option {key!r} given twice in {spec!r}")
        kwargs[key] = _parse_value(value)
    if not name.strip():
        raise MicronetError(f"empty model name in {spec!r}; {_valid_names()}")
    return name.strip(), kwargs


def _format_value(value: int | float | bool) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def create(name_or_spec: str, num_classes: int = 100, **overrides: Any) -> nn.Module:
    """Build a zoo model or a family spec (`name[:key=value,...]`) with keyword `overrides` applied last."""
    name, spec_options = parse_spec(name_or_spec)
    try:
        family, base = resolve(name)
    except KeyError:
        raise MicronetError(f"unknown model {name!r}; {_valid_names()}") from None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise MicronetError(f"num_classes must be a positive integer, got {num_classes!r}")
    requested = {**spec_options, **overrides}
    options = dict(base)
    for key, value in requested.items():
        if key not in family.defaults:
            valid = ", ".join(family.defaults)
            raise MicronetError(f"{family.name} has no option {key!r}; valid options: {valid}")
        try:
            options[key] = coerce_option(family.defaults[key], value)
        except TypeError as exc:
            raise MicronetError(f"{family.name} option {key}: {exc}") from None
    try:
        model = family.cls(**options, num_classes=num_classes)
    except ValueError as exc:
        raise MicronetError(f"cannot build {name_or_spec!r}: {exc}") from None
    # Canonical name: the base name plus only the options that differ from it, in signature order, so that
    # re-creating from the name (or from name + all kwargs) gives back the same string.
    changed = [key for key in family.defaults if key in requested and options[key] != base[key]]
    suffix = ",".join(f"{key}={_format_value(options[key])}" for key in changed)
    canonical = f"{name}:{suffix}" if suffix else name
    model.micronet_spec = {"name": canonical, "family": family.name, "num_classes": num_classes,
                           "kwargs": options}
    return model


def describe_models(names: list[str] | None = None, input_size: tuple[int, int, int] = (3, 32, 32),
                    num_classes: int = 100) -> list[dict[str, Any]]:
    """Name, family, parameter count and dense MACs per image of each zoo model (or each given spec)."""
    key = tuple(list_models() if names is None else names)
    return [dict(row) for row in _describe(key, tuple(input_size), num_classes)]


@functools.lru_cache(maxsize=16)
def _describe(names: tuple[str, ...], input_size: tuple[int, int, int], num_classes: int) -> tuple[dict, ...]:
    # Cached: the figures depend only on the architecture. The collector is paused while the networks are built:
    # each creates thousands of modules, which would set off full collections of everything torch has loaded
    # (about a third of the time). The throwaway models are collected at the next collection after this.
    with collector_paused():
        return tuple(_describe_one(name, input_size, num_classes) for name in names)


def _describe_one(name: str, input_size: tuple[int, int, int], num_classes: int) -> dict[str, Any]:
    # A throwaway meta-device model: no memory, no arithmetic (forward_macs stubs convs and linears).
    model = build_for_sizing(functools.partial(create, name, num_classes=num_classes))
    entry = zoo().get(model.micronet_spec["name"])
    return {
        "name": model.micronet_spec["name"],
        "family": model.micronet_spec["family"],
        "params": count_params(model),
        "macs": forward_macs(model, input_size),
        "summary": entry.summary if entry else "",
    }
