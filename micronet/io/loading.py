"""Any file -> model: format detection, micronet checkpoints, plain state_dicts and the 2019 winner's format.

This is the one place that turns what a user points at into a model (the scorer, the exporter and ``eval``
all load through it), and that knows how each format expects its images normalised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from micronet import models
from micronet.compress.state import classifier_name
from micronet.data import Normalization, get_normalization, normalization_from_record, test_images
from micronet.errors import MicronetError
from micronet.io.checkpoint import load, load_into, load_state_dict_file, read_header, read_metadata
from micronet.io.riair2019 import build_riair2019, looks_like_riair2019
from micronet.io.untrusted import check_model_budget

FORMATS = ("auto", "micronet", "state_dict", "riair2019")


def create_model(name: str, num_classes: int = 100, *, allow_large: bool = False) -> nn.Module:
    """Build a zoo model by name or spec string, with a one-line error for unknown names; specs above the
    parameter budget (``io.untrusted.MAX_PARAMS``) are refused unless ``allow_large``."""
    check_model_budget(name, num_classes, allow_large=allow_large)
    try:
        return models.create(name, num_classes=num_classes)
    except MicronetError:
        raise
    except (KeyError, ValueError) as exc:
        raise MicronetError(f"unknown model {name!r}: {exc}") from None


def _model_for_state(name: str, state: dict[str, Tensor], allow_large: bool = False) -> nn.Module:
    """The zoo model ``name`` with as many classes as the state_dict's classifier has rows."""
    model = create_model(name, allow_large=allow_large)
    fc = classifier_name(model)
    rows = state.get(f"{fc}.weight")
    if rows is not None and rows.dim() == 2 and rows.shape[0] != model.get_submodule(fc).out_features:
        model = create_model(name, num_classes=int(rows.shape[0]), allow_large=allow_large)
    return model


def _is_micronet_checkpoint(path: Path) -> bool:
    meta = read_metadata(path)
    return bool(meta and meta.get("micronet_format"))


def detect_format(path: str | Path) -> str:
    """Guess a file's format: micronet (safetensors with micronet metadata), riair2019 (by key layout), state_dict."""
    path = Path(path)
    if _is_micronet_checkpoint(path):
        return "micronet"
    return "riair2019" if looks_like_riair2019(load_state_dict_file(path)) else "state_dict"


def load_model(path: str | Path, format: str = "auto", model: str | None = None, *, allow_large: bool = False,
               **riair_kwargs: Any) -> nn.Module:
    """Load a model from a micronet checkpoint, a plain state_dict (``model`` names the architecture) or a
    riair2019 merged checkpoint. Errors are one-line MicronetErrors; ``allow_large`` lifts the parameter budget."""
    path = Path(path)
    if format not in FORMATS:
        raise MicronetError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")
    if not path.exists():
        raise MicronetError(f"file not found: {path}")
    if path.is_dir():
        raise MicronetError(f"{path} is a directory, not a checkpoint file")
    if format in ("auto", "micronet") and _is_micronet_checkpoint(path):
        return load(path, allow_large=allow_large).model
    if format == "micronet":
        raise MicronetError(f"{path} is not a micronet checkpoint (no micronet metadata)")
    state = load_state_dict_file(path)
    if format == "riair2019" or (format == "auto" and looks_like_riair2019(state)):
        return build_riair2019(state, source=str(path), **riair_kwargs)
    if model is None:
        raise MicronetError(f"{path} is a plain state_dict: name its architecture with --model")
    return load_into(_model_for_state(model, state, allow_large), state, source=str(path))


def checkpoint_normalization(path: str | Path, format: str = "auto") -> Normalization:
    """Normalization a checkpoint expects: recorded in micronet checkpoints (a preset's name, or for
    ``train-stats`` the training set's mean/std numbers), the legacy double /255 scaling for the 2019 winner's
    file (spec riair2019-format.md), CIFAR-100 statistics otherwise."""
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "riair2019":
        return get_normalization("riair2019")
    if fmt == "micronet":
        extra = read_header(path)["extra"]
        if not isinstance(extra, dict):
            raise MicronetError(f"{path}: checkpoint metadata 'extra' is not a mapping")
        return normalization_from_record(extra.get("normalization", "cifar100"), extra.get("normalization_stats"),
                                         str(path))
    return get_normalization("cifar100")


def checkpoint_test_images(path: str | Path | None, root: str | Path, samples: int, format: str = "auto",
                           dataset: str = "auto") -> Tensor:
    """The first ``samples`` test images under ``root``, normalised as the checkpoint at ``path`` expects
    (CIFAR-100 statistics when there is no checkpoint)."""
    norm = checkpoint_normalization(path, format) if path is not None else get_normalization("cifar100")
    return test_images(root, samples, norm, dataset)


checkpoint_test_images.__test__ = False  # a library function, not a pytest test
