"""Stage provenance: what produced a stage checkpoint, and whether an existing one may be reused or replaced.

Every stage checkpoint records (``extra["provenance"]``) the things that decide its content:

* ``settings``: the stage's settings after every override (``--epochs``, ``--set ...``);
* ``recipe``: the recipe fields every stage shares (model, dataset layout, seed, normalization, split
  sizes and seeds, augmentation; not the recipe's name or file path, which do not change what is trained);
* ``model``: the canonical architecture name and class count;
* ``inputs``: the content hash of the ``--from`` and ``--teacher`` checkpoints (micronet checkpoints carry
  ``content_sha256`` in their metadata; other files are hashed byte for byte);
* ``data``: the layout and a hash of the train, held-out and test images and labels (so the dataset's
  identity *and* the split are covered);
* ``code``: the micronet version.

Its ``fingerprint`` is the SHA-256 of all of that. ``train-stage all`` reuses a finished stage only when its
recorded fingerprint equals the one the current recipe, data and inputs give; anything else stops the run
before any work, naming what changed. A finished checkpoint is replaced only when asked (``--overwrite`` or
``--rerun-from``); the old one is kept as ``STAGE.prev.safetensors`` until the new one is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from micronet import __version__
from micronet import io as mio
from micronet.data import ImageSet
from micronet.errors import MicronetError
from micronet.training.recipe import Recipe
from micronet.training.stage_specs import STAGES

FINGERPRINT_VERSION = 1


# ----------------------------------------------------------------------------------------------- hashing
def _canonical(value: Any) -> Any:
    """JSON-ready form of settings values (dataclasses, tuples, paths) so equal settings hash equally."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _canonical(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def images_hash(data: ImageSet | None) -> str | None:
    """SHA-256 of an image set's pixels, labels and class names (None for no set)."""
    if data is None:
        return None
    h = hashlib.sha256()
    for t in (data.images, data.labels):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(list(data.classes)).encode())
    return h.hexdigest()


def checkpoint_hash(path: str | os.PathLike | None) -> str | None:
    """The content hash of a checkpoint file: its recorded ``content_sha256``, else the file's SHA-256."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise MicronetError(f"checkpoint {path} does not exist")
    recorded = (mio.read_metadata(path) or {}).get("content_sha256")
    if recorded:
        return recorded
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class DataIdentity:
    """What a stage trains and is measured on: layout plus content hashes of the three splits."""

    layout: str
    train: str
    val: str | None
    test: str

    @classmethod
    def of(cls, layout: str, train: ImageSet, val: ImageSet | None, test: ImageSet) -> DataIdentity:
        """Hash the splits (a CIFAR-sized train split takes well under a second)."""
        return cls(layout, images_hash(train), images_hash(val), images_hash(test))


# ----------------------------------------------------------------------------------------------- fingerprints
def stage_provenance(stage: str, recipe: Recipe, *, model: str, num_classes: int, data: DataIdentity,
                     init_from: str | os.PathLike | None, teacher: str | os.PathLike | None) -> dict[str, Any]:
    """The provenance record of ``stage`` under ``recipe`` with these inputs, with its ``fingerprint``."""
    cfg = recipe.stage(stage)
    record: dict[str, Any] = {
        "version": FINGERPRINT_VERSION,
        "stage": stage,
        "settings": _canonical(cfg),
        "recipe": {
            "dataset": recipe.dataset, "seed": recipe.seed, "normalization": recipe.normalization,
            "holdout": float(recipe.holdout),  # float: fingerprints of runs made before counts were ints stay valid
            "holdout_seed": recipe.holdout_seed, "subsample": recipe.subsample,
            "subsample_seed": recipe.subsample_seed,
            "augment": _canonical(recipe.augment) if recipe.augment is not None else None,
        },
        "model": {"name": model, "num_classes": num_classes},
        "inputs": {"from": checkpoint_hash(init_from), "teacher": checkpoint_hash(teacher)},
        "data": dataclasses.asdict(data),
        "code": __version__,
    }
    record["fingerprint"] = _sha256({k: v for k, v in record.items() if k != "fingerprint"})
    return record


def recorded_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance a stage checkpoint records (None for checkpoints written before provenance existed)."""
    return mio.read_header(path)["extra"].get("provenance")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _label(key: str, stage: str, previous: str | None) -> str:
    """A person's name for a flattened provenance key."""
    section, _, rest = key.partition(".")
    if section == "settings":
        return f"stages.{stage}.{rest}"
    if section == "recipe":
        return rest if rest in ("dataset", "seed") or rest.startswith("augment") else f"data.{rest}"
    if key == "inputs.from":
        return f"its input checkpoint ({previous or '--from'})"
    if key == "inputs.teacher":
        return "the teacher checkpoint"
    if section == "data":
        return {"layout": "dataset layout", "train": "training images or split", "val": "held-out split",
                "test": "test images"}.get(rest, key)
    if key.startswith("model."):
        return "model" if rest == "name" else "number of classes"
    if key == "code":
        return "micronet version"
    return key


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:12] if isinstance(value, str) and len(value) == 64 else text


def differences(recorded: Mapping[str, Any] | None, expected: Mapping[str, Any], previous: str | None = None,
                ) -> list[str]:
    """What changed between a recorded and an expected provenance, as short phrases (empty: identical)."""
    if recorded is None:
        return ["no provenance recorded (written by an older micronet)"]
    if recorded.get("fingerprint") == expected.get("fingerprint"):
        return []
    stage = str(expected.get("stage"))
    old = _flatten({k: v for k, v in recorded.items() if k != "fingerprint"})
    new = _flatten({k: v for k, v in expected.items() if k != "fingerprint"})
    changed = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            label = _label(key, stage, previous)
            if key.startswith(("inputs.", "data.")):
                changed.append(f"{label} changed")
            else:
                changed.append(f"{label} {_short(old.get(key, 'unset'))} -> {_short(new.get(key, 'unset'))}")
    return list(dict.fromkeys(changed)) or ["fingerprint differs"]


# ----------------------------------------------------------------------------------------------- decisions
def stage_status(path: Path) -> str:
    """``missing``, ``partial`` (resumable) or ``complete`` for a stage checkpoint path."""
    if not Path(path).exists():
        return "missing"
    training = mio.read_header(path)["extra"].get("training", {})
    return "complete" if training.get("complete") else "partial"


def stale_error(path: Path, stage: str, changes: list[str]) -> MicronetError:
    """The one-line refusal to reuse ``path`` (what changed, and the two ways on)."""
    shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
    return MicronetError(f"{path} was made with different inputs ({shown}): pass --rerun-from {stage} to "
                         f"recompute {stage} and every later stage, or use a new --out")


def decide(path: Path, expected: Mapping[str, Any], *, resume: bool, overwrite: bool,
           previous: str | None = None) -> str:
    """What a single stage run does with an existing ``path``: ``fresh``, ``resume`` or ``reuse``.

    Refuses (one-line MicronetError) to resume or reuse a checkpoint made with other inputs, and to
    replace one unless ``overwrite``.
    """
    status = stage_status(path)
    stage = str(expected["stage"])
    if status == "missing" or overwrite:
        return "fresh"
    if not resume:
        what = "a finished" if status == "complete" else "an unfinished"
        hint = "" if status == "complete" else " --resume to continue it,"
        raise MicronetError(f"{path} is {what} {stage!r} checkpoint: pass{hint} --overwrite to replace it "
                            f"(the old one is kept as {prev_path(path).name} until the new one is complete), "
                            "or a new --out")
    changes = differences(recorded_provenance(path), expected, previous)
    if changes:
        raise stale_error(path, stage, changes)
    return "reuse" if status == "complete" else "resume"


def prev_path(path: Path) -> Path:
    """Where an overwritten checkpoint (or log) waits until its replacement is complete."""
    return path.with_name(f"{path.name.split('.')[0]}.prev{''.join(path.suffixes)}")


def set_aside(path: Path) -> None:
    """Move a stage's checkpoint and log to their ``.prev`` names before it is recomputed.

    An unfinished replacement never displaces a kept ``.prev``: that one is still the last complete result."""
    keep = prev_path(path).exists() and stage_status(path) != "complete"
    for p in (path, path.with_suffix(".jsonl")):
        if p.exists():
            if keep:
                p.unlink()
            else:
                os.replace(p, prev_path(p))


def drop_previous(path: Path) -> None:
    """The new checkpoint is complete: the ``.prev`` copies have served their purpose."""
    for p in (path, path.with_suffix(".jsonl")):
        prev_path(p).unlink(missing_ok=True)


def plan_chain(chain: list[str], out: Path, expected: Mapping[str, Mapping[str, Any] | None],
               previous: Mapping[str, str | None], rerun_from: str | None = None) -> dict[str, str]:
    """For ``train-stage all``: ``reuse``, ``resume``, ``run`` or ``rerun`` per stage, checked before any work.

    ``expected[stage]`` is the provenance the stage would get now, or None where it cannot be known yet
    (its input is still to be computed). Any refusal is raised here, so a run never stops half-way for it.
    """
    if rerun_from is not None and rerun_from not in chain:
        raise MicronetError(f"--rerun-from {rerun_from}: the recipe's stages are {', '.join(chain)}")
    plan: dict[str, str] = {}
    pending: str | None = None  # the first stage that will produce new content
    rerunning = False
    for stage in chain:
        path = out / f"{stage}.safetensors"
        status = stage_status(path)
        rerunning = rerunning or stage == rerun_from
        if rerunning:
            plan[stage] = "rerun" if status != "missing" else "run"
            continue
        if pending is not None:
            if status != "missing":
                raise MicronetError(f"{path} exists but an earlier stage ({pending}) is still to be computed, so "
                                    f"it would be stale: pass --rerun-from {pending} or use a new --out")
            plan[stage] = "run"
            continue
        if status == "missing":
            plan[stage], pending = "run", stage
            continue
        want = expected.get(stage)
        assert want is not None  # every input of a stage before ``pending`` exists
        changes = differences(recorded_provenance(path), want, previous.get(stage))
        if changes:
            raise stale_error(path, stage, changes)
        plan[stage] = "reuse" if status == "complete" else "resume"
        if status == "partial":
            pending = stage
    return plan


# ----------------------------------------------------------------------------------------------- runs show
def run_chain(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The stage checkpoints in a run folder, in pipeline order: stage, status, fingerprint, metrics, timing."""
    out = Path(out)
    if not out.is_dir():
        raise MicronetError(f"{out} is not a run folder (no such directory)")
    paths = {p.name.split(".")[0]: p for p in sorted(out.glob("*.safetensors"))
             if ".prev." not in p.name and ".best." not in p.name}
    order = [s for s in STAGES if s in paths] + sorted(s for s in paths if s not in STAGES)
    if not order:
        raise MicronetError(f"{out} holds no stage checkpoints (*.safetensors)")
    rows = []
    for stage in order:
        header = mio.read_header(paths[stage])
        extra = header["extra"]
        training = extra.get("training", {})
        entry = header["history"][-1] if header["history"] else {}
        provenance = extra.get("provenance") or {}
        inputs = provenance.get("inputs") or {}
        rows.append({
            "stage": stage, "file": paths[stage].name,
            "status": "complete" if training.get("complete") else "partial",
            "fingerprint": provenance.get("fingerprint"),
            "from": inputs.get("from"), "teacher": inputs.get("teacher"),
            "content_sha256": (mio.read_metadata(paths[stage]) or {}).get("content_sha256"),
            "model": header["model"].get("name"),
            "epochs_done": training.get("epochs_done"),
            "metrics": header["metrics"],
            "started": entry.get("started"), "finished": entry.get("finished"), "seconds": entry.get("seconds"),
            "previous_kept": prev_path(paths[stage]).exists(),
        })
    return rows
