"""Training recipes: one YAML file holds every stage's settings; validated before anything trains.

Layout of a recipe (see ``micronet/recipes/*.yaml``; every key is optional except ``model``)::

    name: micronet2019-densenet
    model: densenet100_k12          # zoo name or FAMILY:key=value spec (micronet.models.create)
    teacher_model: densenet172_k30  # what the `teacher` stage trains
    dataset: cifar100               # cifar100 | cifar10 | folder | auto
    seed: 0
    data: {normalization: micronet2019, holdout: 5000, holdout_seed: 0}   # or train-stats; subsample: N
    augment: {policy: micronet2019, ops_per_image: 1, crop_padding: 4, pad_fill: mean, flip: true, cutout: 16}
    train: {...}                    # defaults for every stage (any stage's key; each stage takes its own)
    stages:                         # which stages exist, in pipeline order, with their own settings
      teacher: {epochs: 300, lr: 0.1, warmup_epochs: 5, warmup_start_lr: 0.001, loss: ce}
      prune: {sparsity: 0.75, mask_update_every: 50, mask_update_until: 5000}
      ...

Overrides (the CLI's ``--epochs``, ``--lr``, ``--set stages.prune.sparsity=0.5`` ...) are applied to the
raw YAML tree *before* validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from micronet import models
from micronet.data import DATASETS, NORMALIZATIONS, TRAIN_STATS, holdout_amount
from micronet.errors import MicronetError
from micronet.io import load_yaml_file
from micronet.training.augment import TORCHVISION_POLICIES, AugmentConfig, check_track, load_policy
from micronet.training.kd import DIRECTIONS, KDConfig
from micronet.training.stage_specs import FROM_SCRATCH, STAGE_SPECS, STAGES, StageSettings

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _yaml():
    """PyYAML, imported when a recipe file or ``--set`` value is parsed.

    Lazy on purpose: ``make gpu-check`` imports micronet.training on bare GPU machines that have torch but not
    pyyaml, and only its recipe *files* need YAML (it builds its recipes as dicts).
    """
    import yaml

    return yaml


def _defaults(settings: type[StageSettings]) -> dict[str, Any]:
    """Every key of a settings class with its default value."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(settings)}


#: Keys each stage accepts, and every key any stage accepts (what the ``train:`` defaults may set).
STAGE_KEYS: dict[str, set[str]] = {name: set(_defaults(spec.settings)) for name, spec in STAGE_SPECS.items()}
_ALL_STAGE_KEYS = set().union(*STAGE_KEYS.values())
_TOP_KEYS = {"name", "description", "model", "teacher_model", "dataset", "seed", "data", "augment", "train", "stages"}
_DATA_KEYS = {"normalization", "holdout", "holdout_seed", "subsample", "subsample_seed"}
# A recipe's name becomes the folder runs/NAME: one path component of plain characters, so it never escapes runs/.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
# Augmentation sizes in pixels: far above any sensible value for 32x32 images, far below an allocation that
# could exhaust memory (crop_padding 100000 would pad every image to a 200032-pixel square).
MAX_AUGMENT_PIXELS = 256
MAX_OPS_PER_IMAGE = 16


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: models, data, augmentation and the ordered stages with their settings."""

    name: str
    model: str
    teacher_model: str | None
    dataset: str
    seed: int
    normalization: str
    holdout: int | float  # an image count (int) or a fraction below 1 (float)
    holdout_seed: int
    augment: AugmentConfig | None
    stages: dict[str, StageSettings]
    source: str = ""
    subsample: int = 0  # train on a stratified subset of this many training images (0: all of them)
    subsample_seed: int = 0

    @property
    def chain(self) -> list[str]:
        """Stages this recipe defines, in pipeline order."""
        return [s for s in STAGES if s in self.stages]

    def stage(self, name: str) -> StageSettings:
        """Settings of stage ``name``; a clear error if the recipe lacks it."""
        if name not in STAGES:
            raise MicronetError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        if name not in self.stages:
            raise MicronetError(f"recipe {self.name} has no {name!r} stage (it defines {', '.join(self.chain)})")
        return self.stages[name]

    def previous(self, name: str) -> str | None:
        """The stage whose checkpoint ``name`` starts from (None for the from-scratch stages)."""
        if name in FROM_SCRATCH:
            return None
        earlier = [s for s in self.chain if STAGES.index(s) < STAGES.index(name) and s != "teacher"]
        return earlier[-1] if earlier else None

    def model_for(self, name: str) -> str:
        """The architecture stage ``name`` trains."""
        if name == "teacher":
            if not self.teacher_model:
                raise MicronetError(f"recipe {self.name} has a teacher stage but no teacher_model")
            return self.teacher_model
        return self.model


# ----------------------------------------------------------------------------------------------- loading
def available_recipes() -> list[str]:
    """Names of the recipes shipped with micronet."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file path from a path or a shipped recipe name (``micronet2019-densenet``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPE_DIR / f"{Path(str(name_or_path)).stem}.yaml"
    if path.suffix in ("", ".yaml", ".yml") and shipped.is_file() and path.name in (shipped.name, shipped.stem):
        return shipped
    raise MicronetError(f"recipe {str(name_or_path)!r} is neither a file nor a shipped recipe "
                        f"({', '.join(available_recipes())})")


def load_recipe(source: str | Path, overrides: Mapping[str, Any] | None = None,
                sets: Iterable[str] = (), strict_track: bool = False) -> Recipe:
    """Read, override (``overrides`` from CLI flags, then ``KEY.PATH=VALUE`` strings) and validate a recipe.

    ``strict_track`` turns the warning about a policy searched on another dataset than the track into an error.
    """
    path = resolve_recipe(source)
    raw = load_yaml_file(path, "recipe")  # safe loader; size, nesting and alias expansion bounded
    if not isinstance(raw, dict):
        raise MicronetError(f"recipe {path} must be a YAML mapping")
    raw = apply_overrides(raw, overrides or {})
    for item in sets:
        raw = apply_set(raw, item)
    try:
        recipe = parse_recipe(raw, source=str(path))
    except MicronetError as exc:
        if path.name in str(exc):
            raise
        raise MicronetError(f"recipe {path.name}: {exc}") from None
    check_track(recipe.augment.policy if recipe.augment else None, recipe.dataset, strict_track)
    return recipe


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Apply the CLI's convenience flags to a raw recipe tree (None values are ignored).

    ``epochs``, ``lr`` and ``batch_size`` set that key in every stage that accepts it (``stages_only``
    restricts them to the listed stages; ``epochs`` also rescales a warm-up to the same fraction of the
    stage, and rescales a stage sized relative to the one before it, bn-recal, by the same factor as that
    stage instead of setting it); ``model``, ``teacher_model``, ``dataset``, ``seed`` are top-level.
    """
    raw = _deep_copy(raw)
    stages_only = overrides.get("stages_only")
    for key in ("model", "teacher_model", "dataset", "seed"):
        if overrides.get(key) is not None:
            raw[key] = overrides[key]
    per_stage = {k: overrides[k] for k in ("epochs", "lr", "batch_size") if overrides.get(k) is not None}
    if per_stage:
        stages = raw.get("stages")
        if not isinstance(stages, dict):
            raise MicronetError("recipe has no stages mapping to apply --epochs/--lr/--batch-size to")
        defaults = raw.get("train") or {}
        before = {name: (s or {}).get("epochs", defaults.get("epochs", 1)) if isinstance(s or {}, dict) else 1
                  for name, s in stages.items()}
        for name, settings in stages.items():
            if stages_only is not None and name not in stages_only:
                continue
            settings = stages[name] = dict(settings or {})
            for key, value in per_stage.items():
                spec = STAGE_SPECS.get(name)
                if key == "epochs" and spec is not None and getattr(spec.settings, "epochs_follow_previous", False):
                    _rescale_with_previous(name, settings, stages, before, value)
                    continue
                if key not in STAGE_KEYS.get(name, set()):
                    continue
                if key == "epochs":  # keep the warm-up the same fraction of the (shorter) stage
                    warmup = settings.get("warmup_epochs", defaults.get("warmup_epochs", 0))
                    old = settings.get("epochs", defaults.get("epochs", 1))
                    if isinstance(warmup, int | float) and isinstance(old, int) and warmup and old > 0:
                        settings["warmup_epochs"] = warmup * value / old
                settings[key] = value
    return raw


def _rescale_with_previous(name: str, settings: dict[str, Any], stages: Mapping[str, Any],
                           before: Mapping[str, Any], epochs: int) -> None:
    """A stage sized relative to the stage before it (bn-recal): scale its length by epochs / that stage's epochs."""
    earlier = [s for s in STAGES if s in stages and STAGES.index(s) < STAGES.index(name) and s != "teacher"
               and "epochs" in STAGE_KEYS.get(s, set())]
    old = before.get(earlier[-1]) if earlier else None
    if not isinstance(old, int) or isinstance(old, bool) or old < 1 or isinstance(epochs, bool):
        return  # nothing to scale against (or a bad value the validation reports)
    ratio = epochs / old
    if settings.get("batches"):
        if isinstance(settings["batches"], int):
            settings["batches"] = max(1, round(settings["batches"] * ratio))
        return
    length = settings.get("passes", 1.0)
    if isinstance(length, int | float) and not isinstance(length, bool):
        settings["passes"] = length * ratio


def apply_set(raw: dict[str, Any], item: str) -> dict[str, Any]:
    """Apply one ``dotted.key=value`` override (the value is parsed as YAML: numbers, bools, lists)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise MicronetError(f"--set expects KEY=VALUE (e.g. stages.prune.sparsity=0.5), got {item!r}")
    yaml = _yaml()
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise MicronetError(f"--set {item!r}: the value is not valid YAML") from None
    raw = _deep_copy(raw)
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise MicronetError(f"--set {item!r}: {part!r} is not a mapping in the recipe")
        node = child
    node[parts[-1]] = value
    return raw


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


# ----------------------------------------------------------------------------------------------- validation
def _check_keys(where: str, given: Mapping[str, Any], valid: set[str]) -> None:
    unknown = sorted(str(k) for k in set(given) - valid)  # str: a YAML key may be a number
    if unknown:
        raise MicronetError(f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(sorted(valid))})")


def _typed(where: str, value: Any, kind: type, name: str) -> Any:
    """``value`` checked against ``kind`` (ints are fine for floats; bools are never numbers)."""
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise MicronetError(f"{where}: {name} must be {kind.__name__}, not {value!r}")
    return value


def _block(where: str, value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise MicronetError(f"{where}: block must be [out, in] (two positive integers) or null, not {value!r}")
    return tuple(value)


def _stage_config(where: str, stage: str, settings: Mapping[str, Any]) -> StageSettings:
    _check_keys(where, settings, STAGE_KEYS[stage])
    spec = STAGE_SPECS[stage]
    defaults = _defaults(spec.settings)
    values: dict[str, Any] = {}
    for key, value in settings.items():
        if key == "kd":
            values[key] = _kd_config(f"{where}.kd", value)
        elif key == "grad_clip":
            values[key] = None if value is None else _typed(where, value, float, key)
        elif key == "block":
            values[key] = _block(where, value)
        else:
            values[key] = _typed(where, value, type(defaults[key]), key)
    cfg = spec.settings(**values)
    try:
        cfg.check(stage)
    except MicronetError as exc:
        raise MicronetError(f"{where}: {exc}") from None
    return cfg


def _kd_config(where: str, value: Any) -> KDConfig:
    if not isinstance(value, dict):
        raise MicronetError(f"{where} must be a mapping (direction, temperature, ce_weight, kd_weight)")
    valid = {f.name for f in dataclasses.fields(KDConfig)}
    _check_keys(where, value, valid)
    kd = KDConfig(**value)
    if kd.direction not in DIRECTIONS:
        raise MicronetError(f"{where}: direction must be one of {', '.join(DIRECTIONS)}, not {kd.direction!r}")
    for name in ("temperature", "ce_weight", "kd_weight"):
        v = getattr(kd, name)
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0 or (name == "temperature" and v == 0):
            raise MicronetError(f"{where}: {name} must be a {'positive' if name == 'temperature' else 'non-negative'}"
                                f" number, not {v!r}")
    return kd


def _augment_config(value: Any) -> AugmentConfig | None:
    if value is None or value is False:
        return None
    if not isinstance(value, dict):
        raise MicronetError("recipe augment: must be a mapping (or null for no augmentation)")
    valid = {f.name for f in dataclasses.fields(AugmentConfig)}
    _check_keys("recipe augment", value, valid)
    cfg = AugmentConfig(**value)
    if cfg.policy is not None and not isinstance(cfg.policy, str):
        raise MicronetError(f"recipe augment: policy must be a name or a JSON path, not {cfg.policy!r}")
    if cfg.policy and cfg.policy not in TORCHVISION_POLICIES:
        load_policy(cfg.policy)  # fails now, not in the first training step
    if (isinstance(cfg.ops_per_image, bool) or not isinstance(cfg.ops_per_image, int)
            or not 1 <= cfg.ops_per_image <= MAX_OPS_PER_IMAGE):
        raise MicronetError(f"recipe augment: ops_per_image must be an integer in 1..{MAX_OPS_PER_IMAGE}, "
                            f"got {cfg.ops_per_image!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_AUGMENT_PIXELS
               for v in (cfg.cutout, cfg.crop_padding)):
        raise MicronetError(f"recipe augment: cutout and crop_padding must be integers in 0..{MAX_AUGMENT_PIXELS}")
    if not isinstance(cfg.flip, bool):
        raise MicronetError(f"recipe augment: flip must be true or false, got {cfg.flip!r}")
    for name in ("pad_fill", "fill"):
        v = getattr(cfg, name)
        if v is not None and v not in ("mean", "black"):
            raise MicronetError(f"recipe augment: {name} must be 'mean' or 'black', got {v!r}")
    if not isinstance(cfg.cuda_graph, bool):
        raise MicronetError(f"recipe augment: cuda_graph must be true or false, got {cfg.cuda_graph!r}")
    return cfg


def parse_recipe(raw: Mapping[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate a raw recipe tree into a Recipe (every error is one line naming the bad key)."""
    where = f"recipe {Path(source).name}"
    _check_keys(where, raw, _TOP_KEYS)
    if not raw.get("model"):
        raise MicronetError(f"{where}: 'model' is required (a zoo name or FAMILY:key=value spec)")
    data = raw.get("data") or {}
    if not isinstance(data, dict):
        raise MicronetError(f"{where}: data must be a mapping")
    _check_keys(f"{where} data", data, _DATA_KEYS)
    normalization = data.get("normalization", "cifar100")
    if normalization not in (*NORMALIZATIONS, TRAIN_STATS):
        raise MicronetError(f"{where}: data.normalization must be one of {', '.join(NORMALIZATIONS)}, {TRAIN_STATS}")
    holdout = holdout_amount(data.get("holdout", 0), f"{where}: data.holdout")
    subsample = _typed(where, data.get("subsample", 0), int, "data.subsample")
    if subsample < 0:
        raise MicronetError(f"{where}: data.subsample must be a non-negative image count (0: all)")
    dataset = raw.get("dataset", "auto")
    if dataset not in ("auto", *DATASETS):
        raise MicronetError(f"{where}: dataset must be auto or one of {', '.join(DATASETS)}, not {dataset!r}")
    defaults = raw.get("train") or {}
    if not isinstance(defaults, dict):
        raise MicronetError(f"{where}: train must be a mapping of stage defaults")
    _check_keys(f"{where} train", defaults, _ALL_STAGE_KEYS)
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise MicronetError(f"{where}: 'stages' must map stage names ({', '.join(STAGES)}) to settings")
    stages: dict[str, StageSettings] = {}
    for name in stages_raw:
        if name not in STAGES:
            raise MicronetError(f"{where}: unknown stage {name!r} (stages: {', '.join(STAGES)})")
    for name in STAGES:
        if name not in stages_raw:
            continue
        own = stages_raw[name] or {}
        if not isinstance(own, dict):
            raise MicronetError(f"{where} stages.{name}: must be a mapping")
        merged = {k: v for k, v in defaults.items() if k in STAGE_KEYS[name]}
        if "kd" in defaults and "kd" in own:
            if not isinstance(defaults["kd"], dict) or not isinstance(own["kd"], dict):
                raise MicronetError(f"{where} stages.{name}.kd and train.kd must be mappings")
            merged["kd"] = {**defaults["kd"], **own["kd"]}
            own = {k: v for k, v in own.items() if k != "kd"}
        merged.update(own)
        stages[name] = _stage_config(f"{where} stages.{name}", name, merged)
    for name, cfg in stages.items():
        if getattr(cfg, "select", "last") == "best" and not holdout:
            raise MicronetError(f"{where} stages.{name}: select: best needs a held-out split (data.holdout > 0)")
    if "teacher" in stages and not raw.get("teacher_model"):
        raise MicronetError(f"{where}: a teacher stage needs teacher_model")
    gate_stages = [name for name in stages if STAGE_SPECS[name].gates]
    if gate_stages:
        with torch.device("meta"):  # shapes only: free even for the full-size model
            model = models.create(str(raw["model"]))
        try:
            STAGE_SPECS[gate_stages[0]].check_model(model)
        except MicronetError as exc:
            raise MicronetError(f"{where}: {exc}") from None
    seed = _typed(where, raw.get("seed", 0), int, "seed")
    # An explicit name must be valid; a default one is the file's stem made valid ("recipe" for a dict).
    name = raw.get("name") or re.sub(r"[^A-Za-z0-9._+-]", "", Path(source).stem) or "recipe"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise MicronetError(f"{where}: name must be letters, digits, '.', '_', '+' or '-' (it names the folder "
                            f"runs/NAME), not {str(name)[:60]!r}")
    for key in ("model", "teacher_model"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise MicronetError(f"{where}: {key} must be a model name or spec string, not {raw[key]!r}")
    return Recipe(
        name=name,
        model=str(raw["model"]),
        teacher_model=raw.get("teacher_model"),
        dataset=dataset,
        seed=seed,
        normalization=normalization,
        holdout=holdout,
        holdout_seed=_typed(where, data.get("holdout_seed", 0), int, "data.holdout_seed"),
        augment=_augment_config(raw.get("augment")),
        stages=stages,
        source=source,
        subsample=subsample,
        subsample_seed=_typed(where, data.get("subsample_seed", 0), int, "data.subsample_seed"),
    )
