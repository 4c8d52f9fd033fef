"""Accounting policies (spec scoring.md c) and tracks (spec a.2): small frozen dataclasses with names.

A policy says at which bit width each kind of value and operation is charged. Presets are values in
``PRESETS``; ``resolve_policy`` turns a name, a YAML file or a ``Policy`` plus field overrides into one,
validating every field at this boundary so the cost rules can trust it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from micronet.errors import MicronetError
from micronet.io import load_yaml_file

ACCUMULATORS = (
    "fp32",
    "fp16_true",
    "int_fixed_bound",
    "int_tree_final",
    "int_tree_final_cap16",
    "adder_tree",
)
# "if_sparse" is the older name of "always_if_sparse" (kept so saved policies and YAML files still load).
MASK_MODES = ("cheapest", "always_if_sparse", "if_sparse", "always")
BN_MODES = ("fold", "unfold")


@dataclass(frozen=True)
class Policy:
    """How values and operations are priced; every width is in bits, every count in 32-bit units."""

    name: str = "official"
    description: str = "rules page + reference counter + organiser rulings (spec a, b, a.8)"
    # Width of the model input; None = float_bits. 8 means normalisation is folded into the first layer
    # and the image enters as uint8 codes.
    input_bits: int | None = 32
    # Width of every unquantized stored value and unquantized activation (16 = freebie / real FP16 runtime).
    float_bits: int = 32
    # Width charged for an unquantized activation entering a conv/linear; None = its own width.
    gemm_input_bits: int | None = None
    # Width of adds outside dot products (residual adds, affine bias, pooling); None = max operand width.
    add_bits: int | None = None
    # Overrides of add_bits for per-channel affine bias adds and for pooling adds (RIAIR FP16/FP32 variants).
    affine_add_bits: int | None = None
    pool_add_bits: int | None = None
    # Cost of the additions inside a conv/linear dot product (spec c.3). Integer modes apply only when
    # both operands are integer codes; a float operand falls back to fp32 accumulation.
    accumulator: str = "fp32"
    linear_accumulator: str | None = None  # None = accumulator
    # Sparse conv/linear weights: stored as nonzeros + bitmask whichever of dense/sparse storage is smaller
    # (cheapest: no entrant stores a 99.99%-dense tensor sparse, so a stray exact zero costs nothing), whenever
    # the tensor has a zero (always_if_sparse, the reference counter's literal rule), or always (RIAIR).
    mask: str = "cheapest"
    # Ops per element for an activation quantizer (round + clamp) on a dynamic tensor, at its input width.
    quantizer_ops: int = 1
    # BatchNorm (and any constant scale) that the deploy form (compress.deploy_form) folded into the float
    # conv/linear before it: charged folded (scale free, shift = bias: C params, +1 add per output when the
    # conv had no bias), or unfolded (BN: 1 mult + 1 add per element and 2C params; a constant scale 1 mult
    # per element), as the separate layers they were in the training form.
    bn: str = "fold"
    # The 16-bit freebie (spec a.3/a.4): only for models with no quantization at all.
    freebie: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field."""
        return dataclasses.asdict(self)

    @property
    def model_input_bits(self) -> int:
        """Width of the model input in bits."""
        return self.float_bits if self.input_bits is None else self.input_bits

    def accumulator_for(self, linear: bool) -> str:
        """Accumulator mode for a conv (linear=False) or a linear/matmul layer."""
        if linear and self.linear_accumulator is not None:
            return self.linear_accumulator
        return self.accumulator


def _riair(t: int, accumulator: str, affine_add: int, pool_add: int, what: str) -> Policy:
    return Policy(
        name=f"riair2019-t{t}",
        description=(
            f"2019 CIFAR-100 winner's score type {t} (documented intent, spec c.9): {what}; FP16 elementwise,"
            " "
            "mask always, quantizer free, FP32 first-conv and FC accumulation"
        ),
        input_bits=32,
        float_bits=16,
        gemm_input_bits=32,
        add_bits=None,
        affine_add_bits=affine_add,
        pool_add_bits=pool_add,
        accumulator=accumulator,
        linear_accumulator="fp32",
        mask="always",
        quantizer_ops=0,
        bn="fold",
    )


PRESETS: dict[str, Policy] = {
    p.name: p
    for p in [
        Policy(),
        Policy(
            name="freebie16",
            description="16-bit freebie for unquantized models: params and mults at 16 bits, adds at 32",
            input_bits=None,
            float_bits=16,
            add_bits=32,
            freebie=True,
        ),
        _riair(0, "adder_tree", 16, 16, "adder tree, FP16 bias and pool adds"),
        _riair(1, "int_fixed_bound", 16, 16, "fixed-length integer accumulator, FP16 bias and pool adds"),
        _riair(2, "fp32", 32, 32, "FP32 accumulation, FP32 bias and pool adds"),
        _riair(3, "int_fixed_bound", 32, 32, "fixed-length integer accumulator, FP32 bias and pool adds"),
        _riair(4, "adder_tree", 32, 32, "adder tree, FP32 bias and pool adds (the leaderboard's 0.0044)"),
        _riair(5, "adder_tree", 16, 32, "adder tree, FP16 bias adds, FP32 pool adds"),
        _riair(
            6, "int_fixed_bound", 16, 32, "fixed-length integer accumulator, FP16 bias adds, FP32 pool adds"
        ),
    ]
}


@dataclass(frozen=True)
class Track:
    """A challenge task's baseline: score = params/params_base + ops/ops_base (both in 32-bit units)."""

    name: str
    baseline_params: int
    baseline_ops: int
    baseline_model: str = ""


TRACKS: dict[str, Track] = {
    "cifar100": Track("cifar100", 36_500_000, 10_490_000_000, "WideResNet-28-10"),
    "imagenet": Track("imagenet", 6_900_000, 1_170_000_000, "MobileNetV2-1.4"),
}


def get_track(track: str | Track) -> Track:
    """Look up a track by name (cifar100, imagenet)."""
    if isinstance(track, Track):
        return track
    if track not in TRACKS:
        raise MicronetError(f"unknown track {track!r}; choose one of: {', '.join(TRACKS)}")
    return TRACKS[track]


def list_policies() -> list[str]:
    """Names of the preset policies."""
    return list(PRESETS)


_FIELD_TYPES = {f.name: f.type for f in fields(Policy)}
_CHOICES = {
    "accumulator": ACCUMULATORS,
    "linear_accumulator": ACCUMULATORS,
    "mask": MASK_MODES,
    "bn": BN_MODES,
}


def _coerce(name: str, value: Any) -> Any:
    """Convert a CLI/YAML value to the field's type, or raise a one-line MicronetError."""
    kind = _FIELD_TYPES[name]
    optional = "None" in str(kind)
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "") and optional:
        return None
    if value is None:
        if optional:
            return None
        raise MicronetError(f"policy field {name!r} cannot be empty")
    if "bool" in str(kind):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise MicronetError(f"policy field {name!r} expects true/false, got {value!r}")
    if "int" in str(kind):
        try:
            number = int(str(value).strip()) if not isinstance(value, int) else value
        except ValueError:
            raise MicronetError(f"policy field {name!r} expects an integer, got {value!r}") from None
        if isinstance(number, bool) or number < 0 or number > 64:
            raise MicronetError(f"policy field {name!r} must be an integer in 0..64, got {value!r}")
        if name.endswith("_bits") and number < 1:
            raise MicronetError(f"policy field {name!r} must be at least 1 bit, got {value!r}")
        return number
    text = str(value).strip()
    if name in _CHOICES and text not in _CHOICES[name]:
        raise MicronetError(f"policy field {name!r} must be one of {', '.join(_CHOICES[name])}; got {text!r}")
    return text


def _parse_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise MicronetError(
            f"policy override {item!r} must look like field=value (e.g. accumulator=adder_tree)"
        )
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def with_overrides(policy: Policy, overrides: dict[str, Any]) -> Policy:
    """Return ``policy`` with some fields replaced, each validated (unknown field -> MicronetError)."""
    clean = {}
    for key, value in overrides.items():
        if key not in _FIELD_TYPES:
            valid = ", ".join(k for k in _FIELD_TYPES if k != "name")
            raise MicronetError(f"unknown policy field {key!r}; valid fields: {valid}")
        clean[key] = _coerce(key, value)
    if not clean:
        return policy
    if "name" not in clean:
        clean["name"] = policy.name + "+" + ",".join(f"{k}={v}" for k, v in clean.items())
    changed = {k: v for k, v in clean.items() if k not in ("name", "description") and getattr(policy, k) != v}
    if "description" not in clean and changed:
        # The base's description no longer holds once a field differs (a custom YAML policy described as "rules
        # page + reference counter" misleads); say what it is instead: the base and exactly what differs.
        what = ", ".join(f"{k}={v}" for k, v in changed.items())
        preset = PRESETS.get(policy.name) == policy
        clean["description"] = f"{policy.name} with {what}" if preset else f"{policy.description}; then {what}"
    return replace(policy, **clean)


def _load_yaml(path: Path) -> Policy:
    data = load_yaml_file(path, "policy file")  # safe loader; size, nesting and alias expansion bounded
    if not isinstance(data, dict):
        raise MicronetError(f"policy file {path} must hold a mapping of policy fields")
    base_name = data.pop("base", "official")
    if not isinstance(base_name, str) or base_name not in PRESETS:  # a file as base could name itself
        raise MicronetError(f"policy file {path}: base must be one of {', '.join(PRESETS)}, not {base_name!r}")
    base = PRESETS[base_name]
    data.setdefault("name", path.stem)
    try:
        return with_overrides(base, data)
    except MicronetError as exc:
        raise MicronetError(f"policy file {path}: {exc}") from None


def resolve_policy(
    policy: str | Policy | None = "official", overrides: dict[str, Any] | None = None
) -> Policy:
    """A preset name, a YAML file path or a Policy, plus validated field overrides -> Policy."""
    if policy is None:
        policy = "official"
    if isinstance(policy, Policy):
        base = policy
    elif policy in PRESETS:
        base = PRESETS[policy]
    elif str(policy).endswith((".yaml", ".yml")):
        path = Path(policy)
        if not path.is_file():
            raise MicronetError(f"policy file not found: {path}")
        base = _load_yaml(path)
    else:
        raise MicronetError(
            f"unknown policy {policy!r}; choose one of: {', '.join(PRESETS)} (or a .yaml file)"
        )
    return with_overrides(base, dict(overrides or {}))


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Parse CLI ``--set field=value`` items into a dict (validated later by resolve_policy)."""
    return dict(_parse_override(item) for item in items)
