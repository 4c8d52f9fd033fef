"""Safe checkpoints: one ``.safetensors`` file, JSON metadata, atomic writes, no pickle.

Layout of a micronet checkpoint:

* tensors: the model's ``state_dict`` (training form: parametrized weights, masks, quantizer scales),
  plus optional extra tensors under the ``__extra__.`` prefix (e.g. a trainer's optimizer state);
* string metadata: ``micronet_format`` (version), ``model`` (JSON of ``model.micronet_spec``),
  ``layout`` (compression layout), ``history`` (list of stages), ``metrics``, ``extra`` (free JSON),
  ``content_sha256`` (hash of every tensor and every other metadata field; checked on load).

Loading builds the model from the zoo, re-creates its compression structure from ``layout`` and loads
the tensors strictly. Plain ``.pt``/``.pth`` state_dicts are read with ``torch.load(weights_only=True)``,
which refuses arbitrary pickled objects instead of executing them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from micronet import models
from micronet.compress.layout import apply_layout, compression_layout
from micronet.errors import MicronetError

FORMAT_VERSION = "1"
EXTRA_PREFIX = "__extra__."


def _safetensors():
    """The safetensors package, imported when a checkpoint is read or written.

    Lazy on purpose: ``make gpu-check`` imports micronet.training on bare GPU machines that have torch but not
    safetensors; its throughput and augmentation sections never touch a checkpoint.
    """
    import safetensors
    import safetensors.torch

    return safetensors


def save_file(tensors: dict[str, Tensor], filename: str, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` (one module-level name, so tests can make a save fail)."""
    _safetensors().torch.save_file(tensors, filename, metadata=metadata)


@dataclass
class Checkpoint:
    """A loaded micronet checkpoint."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    extra_tensors: dict[str, Tensor] = field(default_factory=dict)
    path: Path | None = None


def _content_hash(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    h = hashlib.sha256()
    for key in sorted(metadata):
        h.update(f"{key}={metadata[key]}\n".encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _new_file_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; on any failure (including one raised by ``write``
    after writing, e.g. a failed verification) the old file is untouched and no temp file remains."""
    path = Path(path)
    if not path.parent.exists():
        raise MicronetError(f"output directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode())  # mkstemp makes owner-only files; give the usual umask permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    history: list[dict[str, Any]] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    extra_tensors: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``model`` (with its compression state) and metadata to ``path`` atomically."""

    module = model.module if isinstance(getattr(model, "module", None), nn.Module) else model  # DDP wrapper
    spec = getattr(module, "micronet_spec", None)
    if spec is None:
        raise MicronetError("model was not created by micronet.models.create; cannot record its architecture")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    for k, v in (extra_tensors or {}).items():
        tensors[EXTRA_PREFIX + k] = v.detach().cpu().contiguous().clone()
    metadata = {
        "micronet_format": FORMAT_VERSION,
        "model": json.dumps(spec, sort_keys=True),
        "layout": json.dumps(compression_layout(module), sort_keys=True),
        "history": json.dumps(history or []),
        "metrics": json.dumps(metrics or {}, sort_keys=True),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    metadata["content_sha256"] = _content_hash(tensors, metadata)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The safetensors header metadata of ``path``, or ``None`` if it is not a safetensors file."""
    st = _safetensors()
    try:
        with st.safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (st.SafetensorError, OSError, ValueError, RuntimeError):
        return None


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise MicronetError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise MicronetError(f"checkpoint {path} is not a file")
    if not os.access(path, os.R_OK):
        raise MicronetError(f"checkpoint {path} is not readable")


def _micronet_metadata(path: Path) -> dict[str, str]:
    """The raw string metadata of a micronet checkpoint, with one-line errors for anything else."""
    _check_readable(path)
    metadata = read_metadata(path)
    if metadata is None:
        raise MicronetError(f"{path} is not a safetensors file (truncated or corrupted?)")
    if metadata.get("micronet_format") != FORMAT_VERSION:
        raise MicronetError(f"{path} is a safetensors file but not a micronet checkpoint (format "
                            f"{metadata.get('micronet_format')!r})")
    return metadata


def _parse_header(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    try:
        return {key: json.loads(metadata[key]) for key in ("model", "layout", "history", "metrics", "extra")}
    except (KeyError, json.JSONDecodeError) as exc:
        raise MicronetError(f"{path} has malformed micronet metadata ({exc})") from None


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed metadata of a micronet checkpoint (model, layout, history, metrics, extra), header only."""
    path = Path(path)
    return _parse_header(path, _micronet_metadata(path))


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a micronet ``.safetensors`` checkpoint: rebuild the model, its compression state and tensors."""
    path = Path(path)
    metadata = _micronet_metadata(path)
    st = _safetensors()
    try:
        tensors = st.torch.load_file(str(path), device="cpu")
    except (st.SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MicronetError(f"cannot read {path}: {exc}") from None
    stored_hash = metadata.pop("content_sha256", None)
    if stored_hash != _content_hash(tensors, metadata):
        raise MicronetError(f"{path} failed its content hash check (corrupted or modified)")
    header = _parse_header(path, metadata)
    spec = header["model"]
    model = models.create(spec["name"], num_classes=spec["num_classes"])
    apply_layout(model, header["layout"])
    extra_tensors = {k[len(EXTRA_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(EXTRA_PREFIX)}
    load_into(model, tensors, source=str(path))
    model.to(map_location)
    return Checkpoint(model, header["history"], header["metrics"], header["extra"], extra_tensors, path)


def load_into(model: nn.Module, state_dict: dict[str, Tensor], source: str = "state_dict") -> nn.Module:
    """``load_state_dict(strict=True)`` with a one-line error naming missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            shown = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]
            parts.append(f"shape mismatch: {few(shown)}")
        raise MicronetError(f"{source} does not match the architecture: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
    return model


def _unpickler_detail(message: str) -> str:
    """The informative line of torch's weights-only unpickling error (its text around it is generic advice)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Trying to load unsupported GLOBAL", "Unsupported", "Can only build")):
            return line[:160]
    return (lines[0] if lines else "unreadable")[:160]


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a plain state_dict from ``.pt/.pth/.tar`` (weights_only, never unpickling code) or ``.safetensors``."""
    path = Path(path)
    _check_readable(path)
    if read_metadata(path) is not None:
        st = _safetensors()
        try:
            return st.torch.load_file(str(path), device="cpu")
        except (st.SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise MicronetError(f"cannot read {path}: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        if "GLOBAL" in detail or "global" in detail:  # an object the safe unpickler will not rebuild
            raise MicronetError(f"refused to load {path}: it contains objects other than tensors ({detail})") from None
        raise MicronetError(f"cannot read {path} as a PyTorch state_dict (not a weights file, or corrupted: "
                            f"{detail})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise MicronetError(f"cannot read {path} as a PyTorch state_dict (truncated or corrupted?): "
                            f"{str(exc).splitlines()[0][:160]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise MicronetError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)
