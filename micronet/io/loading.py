"""Any file -> model: format detection, micronet checkpoints, plain state_dicts and the 2019 winner's format.

This is the one place that turns what a user points at into a model (the scorer, the exporter and ``eval``
all load through it), and that knows how each format expects its images normalised.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from micronet import models
from micronet.compress.state import classifier_name
from micronet.data import Normalization, get_normalization, normalization_from_record, test_images
from micronet.errors import MicronetError
from micronet.io.checkpoint import (
    PickledObjectsError,
    load,
    load_into,
    load_state_dict_file,
    read_header,
    read_metadata,
)
from micronet.io.riair2019 import build_riair2019, looks_like_riair2019
from micronet.io.untrusted import check_model_budget

FORMATS = ("auto", "micronet", "state_dict", "riair2019")


EXTERNAL_PREFIXES = ("torchvision:", "timm:")


def is_external_spec(name: str) -> bool:
    """True for ``torchvision:NAME``, ``timm:NAME``, ``module.path:callable`` and ``file.py:callable``
    (a zoo spec ``FAMILY:key=value`` is not one)."""
    if name.startswith(EXTERNAL_PREFIXES):
        return True
    if ":" not in name:
        return False
    left, right = name.rsplit(":", 1)
    if left.endswith(".py"):
        return True
    return "=" not in right and left not in models.list_families() and right.isidentifier()


def parse_model_args(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> keyword arguments; values are Python literals (3, 0.5, True, 'x') or text."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise MicronetError(f"--model-arg {item!r} must look like KEY=VALUE (e.g. num_classes=10)")
        key, text = (part.strip() for part in item.split("=", 1))
        if not key.isidentifier():
            raise MicronetError(f"--model-arg key {key!r} is not a Python identifier")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def _factory(spec: str) -> tuple[Any, str]:
    """The callable a spec names, and a readable name for errors."""
    if spec.startswith("torchvision:"):
        # torchvision is a dependency of the scorer's users, not of micronet: import it only when asked for.
        import torchvision

        name = spec.split(":", 1)[1]
        names = torchvision.models.list_models(module=torchvision.models)
        if name not in names:
            raise MicronetError(f"unknown torchvision classification model {name!r} (e.g. {', '.join(names[:5])}, ...)")
        return (lambda **kw: torchvision.models.get_model(name, **{"weights": None, **kw})), spec
    if spec.startswith("timm:"):
        try:
            import timm  # optional extra: pip install 'micronet[timm]'
        except ImportError:
            raise MicronetError("timm is not installed: pip install timm (or 'micronet[timm]')") from None
        name = spec.split(":", 1)[1]
        if name not in timm.list_models():
            raise MicronetError(f"unknown timm model {name!r}")
        return (lambda **kw: timm.create_model(name, **{"pretrained": False, **kw})), spec
    where, attr = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise MicronetError(f"model file not found: {path}")
        module_name = f"_micronet_user_model_{abs(hash(str(path.resolve())))}"
        try:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module  # dataclasses and pickling look their module up here
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise MicronetError(f"importing {path} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise MicronetError(f"cannot import module {where!r}: {type(exc).__name__}: {_first_line(exc)}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise MicronetError(f"{where} has no callable {attr!r}")
    return fn, spec


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def build_external(spec: str, model_args: dict[str, Any] | None = None) -> nn.Module:
    """Build a model from ``torchvision:NAME``, ``timm:NAME``, ``module.path:callable`` or ``file.py:callable``,
    called with ``model_args`` as keywords (none by default)."""
    fn, name = _factory(spec)
    try:
        model = fn(**(model_args or {}))
    except MicronetError:
        raise
    except Exception as exc:
        raise MicronetError(f"building {name} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise MicronetError(f"{name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def create_model(name: str, num_classes: int = 100, model_args: dict[str, Any] | None = None, *,
                 allow_large: bool = False) -> nn.Module:
    """Build a zoo model by name or spec string, or an external one (see ``build_external``), with a one-line
    error for unknown names; zoo specs above the parameter budget (``io.untrusted.MAX_PARAMS``) are refused
    unless ``allow_large``."""
    if is_external_spec(name):
        return build_external(name, model_args)
    if model_args:
        raise MicronetError("--model-arg applies to torchvision:, timm:, module:callable and file.py:callable models")
    check_model_budget(name, num_classes, allow_large=allow_large)
    try:
        return models.create(name, num_classes=num_classes)
    except MicronetError:
        raise
    except (KeyError, ValueError) as exc:
        raise MicronetError(f"unknown model {name!r}: {exc}") from None


def _model_for_state(name: str, state: dict[str, Tensor], model_args: dict[str, Any] | None = None,
                     allow_large: bool = False) -> nn.Module:
    """The zoo model ``name`` with as many classes as the state_dict's classifier has rows (an external model
    is built as its factory says)."""
    if is_external_spec(name):
        return build_external(name, model_args)
    # Which layer is the classifier is read off a shape-only build, so the real model is built once.
    fc = classifier_name(models.build_for_sizing(lambda: create_model(name, allow_large=allow_large)))
    rows = state.get(f"{fc}.weight")
    if rows is not None and rows.dim() == 2:
        return create_model(name, num_classes=int(rows.shape[0]), allow_large=allow_large)
    return create_model(name, allow_large=allow_large)


def _is_micronet_checkpoint(path: Path) -> bool:
    meta = read_metadata(path)
    return bool(meta and meta.get("micronet_format"))


def detect_format(path: str | Path) -> str:
    """Guess a file's format: micronet (safetensors with micronet metadata), riair2019 (by key layout), state_dict."""
    path = Path(path)
    if _is_micronet_checkpoint(path):
        return "micronet"
    return "riair2019" if looks_like_riair2019(load_state_dict_file(path)) else "state_dict"


def _load_pickled_module(path: Path) -> nn.Module | dict[str, Tensor]:
    """A whole pickled module (or a checkpoint dict around a state_dict) — unpickling runs code from the file,
    so only on the user's explicit --trust-pickle."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError, ModuleNotFoundError) as exc:
        raise MicronetError(f"cannot unpickle {path}: {type(exc).__name__}: {_first_line(exc)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), nn.Module):
        obj = obj["model"]
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if isinstance(obj, nn.Module) or (isinstance(obj, dict) and all(isinstance(v, Tensor) for v in obj.values())):
        return obj
    raise MicronetError(f"{path} holds a {type(obj).__name__}, neither a module nor a state_dict")


def load_model(path: str | Path, format: str = "auto", model: str | None = None, *, trust_pickle: bool = False,
               model_args: dict[str, Any] | None = None, allow_large: bool = False, **riair_kwargs: Any) -> nn.Module:
    """Load a model from a micronet checkpoint, a plain state_dict (``model`` names the architecture: zoo or
    external spec), a riair2019 merged checkpoint, or with ``trust_pickle`` a whole pickled module. Errors are
    one-line MicronetErrors; ``allow_large`` lifts the parameter budget."""
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
    try:
        state = load_state_dict_file(path)
    except PickledObjectsError:  # the safe reader's own verdict: no second, unguarded read of the file
        if not trust_pickle:
            raise MicronetError(f"{path} holds pickled Python objects (e.g. a whole model), not just tensors; if you "
                                "trust the file, pass --trust-pickle (unpickling runs code from the file)") from None
        loaded = _load_pickled_module(path)
        if isinstance(loaded, nn.Module):
            return loaded
        state = loaded
    if format == "riair2019" or (format == "auto" and looks_like_riair2019(state)):
        return build_riair2019(state, source=str(path), **riair_kwargs)
    if model is None:
        raise MicronetError(f"{path} is a plain state_dict: name its architecture with --model")
    return load_into(_model_for_state(model, state, model_args, allow_large), state, source=str(path))


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


def recorded_normalization(path: str | Path, format: str = "auto") -> Normalization | None:
    """The normalisation a checkpoint records (micronet metadata, or the riair2019 format's legacy scaling), or
    None for a plain state_dict, a pickled module or a checkpoint without a record, whose normalisation would only
    be a guess."""
    try:
        fmt = detect_format(path) if format == "auto" else format
    except PickledObjectsError:  # a whole pickled module (--trust-pickle): no format that records normalisation
        return None
    recorded = fmt == "riair2019"
    if fmt == "micronet":
        extra = read_header(path).get("extra")
        recorded = isinstance(extra, dict) and "normalization" in extra
    return checkpoint_normalization(path, fmt) if recorded else None


def checkpoint_test_images(path: str | Path | None, root: str | Path, samples: int, format: str = "auto",
                           dataset: str = "auto") -> Tensor:
    """The first ``samples`` test images under ``root``, normalised as the checkpoint at ``path`` expects
    (CIFAR-100 statistics when there is no checkpoint)."""
    norm = checkpoint_normalization(path, format) if path is not None else get_normalization("cifar100")
    return test_images(root, samples, norm, dataset)


checkpoint_test_images.__test__ = False  # a library function, not a pytest test
