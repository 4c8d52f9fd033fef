"""Name -> constructor registry (timm style): model families and the zoo's named presets.

A *family* is a parameterised `nn.Module` class registered with `@register_family("name")`; its
architecture options are the keyword arguments of `__init__` (all with defaults) other than
`num_classes`. A *zoo model* is a family plus preset options, registered with `register_model(...)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch.nn as nn

ModelClass = TypeVar("ModelClass", bound=type[nn.Module])
OptionValue = int | float | bool


@dataclass(frozen=True)
class Family:
    """A registered model class and its architecture options with their default values."""

    name: str
    cls: Callable[..., nn.Module]
    defaults: Mapping[str, OptionValue]


@dataclass(frozen=True)
class ZooEntry:
    """A named preset: a family plus the option values that differ from the family defaults."""

    name: str
    family: str
    preset: Mapping[str, OptionValue] = field(default_factory=dict)
    summary: str = ""


_FAMILIES: dict[str, Family] = {}
_ZOO: dict[str, ZooEntry] = {}


def register_family(name: str) -> Callable[[ModelClass], ModelClass]:
    """Class decorator: register a parameterised model class under the family name `name`."""

    def decorator(cls: ModelClass) -> ModelClass:
        defaults: dict[str, OptionValue] = {}
        for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
            if param.name == "num_classes":
                continue
            if param.default is inspect.Parameter.empty or not isinstance(param.default, int | float):
                raise TypeError(f"{cls.__name__}.{param.name}: family options need an int/float/bool default")
            defaults[param.name] = param.default
        if name in _FAMILIES or name in _ZOO:
            raise ValueError(f"model name {name!r} is already registered")
        _FAMILIES[name] = Family(name, cls, defaults)
        return cls

    return decorator


def register_model(name: str, family: str, summary: str = "", **preset: OptionValue) -> ZooEntry:
    """Register the zoo name `name` as `family` with the option values `preset`."""
    if name in _FAMILIES or name in _ZOO:
        raise ValueError(f"model name {name!r} is already registered")
    defaults = _FAMILIES[family].defaults
    unknown = sorted(set(preset) - set(defaults))
    if unknown:
        raise TypeError(f"{name}: {family} has no option(s) {unknown}")
    typed = {key: coerce_option(defaults[key], value) for key, value in preset.items()}
    entry = ZooEntry(name, family, typed, summary)
    _ZOO[name] = entry
    return entry


def coerce_option(default: OptionValue, value: OptionValue) -> OptionValue:
    """`value` converted to the type of the option's `default` (int -> float allowed); TypeError otherwise."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"expected {type(default).__name__}, got {value!r}")


def families() -> dict[str, Family]:
    """All registered families by name."""
    return dict(_FAMILIES)


def zoo() -> dict[str, ZooEntry]:
    """All registered zoo presets by name, in registration order."""
    return dict(_ZOO)


def resolve(name: str) -> tuple[Family, dict[str, Any]]:
    """The family behind a zoo or family name and its options before overrides (KeyError if unknown)."""
    if name in _ZOO:
        entry = _ZOO[name]
        family = _FAMILIES[entry.family]
        return family, {**family.defaults, **entry.preset}
    family = _FAMILIES[name]
    return family, dict(family.defaults)
