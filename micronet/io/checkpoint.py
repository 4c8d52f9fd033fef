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
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from struct import error as struct_error
from typing import Any

import torch
from torch import Tensor, nn

from micronet import models
from micronet.compress.layout import apply_layout, compression_layout
from micronet.compress.quant import MAX_BITS, MIN_BITS
from micronet.errors import MicronetError
from micronet.io.files import atomic_write
from micronet.io.untrusted import (
    TORCH_DTYPES,
    check_model_budget,
    check_zip_archive,
    first_line,
    parse_json,
    safetensors_header,
)

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


def save(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    history: list[dict[str, Any]] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    extra_tensors: dict[str, Tensor] | None = None,
    force: bool = True,
) -> Path:
    """Write ``model`` (with its compression state) and metadata to ``path`` atomically (``force=False``: refuse
    to replace an existing file)."""

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
    # Serialised in memory and written by us: safetensors' own file writer leaves an anonymous temp file
    # behind when killed, which nothing could recognise and clean up.
    data = _safetensors().torch.save(tensors, metadata=metadata)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write, force=force)


def read_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The safetensors header metadata of ``path``, or ``None`` if it is not a safetensors file. A file that
    starts like safetensors but whose header is damaged raises a one-line error."""
    path = Path(path)
    _check_readable(path)
    parsed = safetensors_header(path)
    return None if parsed is None else parsed[1]


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise MicronetError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise MicronetError(f"checkpoint {path} is not a file")
    if not os.access(path, os.R_OK):
        raise MicronetError(f"checkpoint {path} is not readable")


def _micronet_metadata(path: Path) -> dict[str, str]:
    """The raw string metadata of a micronet checkpoint, with one-line errors for anything else."""
    metadata = read_metadata(path)
    if metadata is None:
        raise MicronetError(f"{path} is not a safetensors file (truncated or corrupted?)")
    if metadata.get("micronet_format") != FORMAT_VERSION:
        raise MicronetError(f"{path} is a safetensors file but not a micronet checkpoint (format "
                            f"{str(metadata.get('micronet_format'))[:40]!r})")
    return metadata


# ----------------------------------------------------------------------------------------------- metadata schema
# The content hash detects accidents, not attackers (anyone can recompute it), so every metadata value is
# checked for type and range here, whether or not the hash matches, before anything is built from it.
_MASK = {"sparsity": (float, int), "group": (str,), "gradient": (str,), "block": (list, type(None)),
         "frozen": (bool,)}
_WEIGHT_QUANT = {"bits": (int,), "per_channel": (bool,), "refit_iters": (int,), "refit": (str,)}
_INPUT_QUANT = {"bits": (int,), "signed": (bool, type(None)), "method": (str,), "percentile": (float, int),
                "learn_scale": (bool,)}
_ORDER = ("WeightMask", "WeightQuantizer")


def _fields(where: str, value: Any, schema: dict[str, tuple[type, ...]]) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) - set(schema) or set(schema) - set(value) - {"frozen", "block"}:
        raise MicronetError(f"{where} must be a mapping with keys {', '.join(schema)}")
    for key, kinds in schema.items():
        v = value.get(key)
        if key in value and (not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds)):
            raise MicronetError(f"{where}.{key} has the wrong type ({type(v).__name__})")
    return value


def _check_bits(where: str, bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise MicronetError(f"{where}.bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")


def _check_layout(where: str, layout: Any) -> None:
    if not isinstance(layout, dict):
        raise MicronetError(f"{where} 'layout' must be a mapping of module names")
    for name, entry in layout.items():
        at = f"{where} layout[{name[:60]!r}]"
        if not isinstance(entry, dict) or set(entry) - {"mask", "weight_quant", "input_quant", "order"}:
            raise MicronetError(f"{at} must be a mapping of mask, weight_quant, input_quant, order")
        order = entry.get("order", [])
        if not isinstance(order, list) or len(order) > 2 or len(set(map(str, order))) != len(order) or any(
                k not in _ORDER for k in order):
            raise MicronetError(f"{at}.order must list distinct {' / '.join(_ORDER)}")
        if "WeightMask" in order:
            mask = _fields(f"{at}.mask", entry.get("mask"), _MASK)
            if not 0 <= mask["sparsity"] <= 1 or mask["gradient"] not in ("dense", "masked"):
                raise MicronetError(f"{at}.mask: sparsity must be in 0..1 and gradient dense or masked")
            block = mask.get("block")
            if block is not None and (len(block) != 2 or not all(
                    isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 4096 for b in block)):
                raise MicronetError(f"{at}.mask.block must be [out, in], two integers in 1..4096")
        if "WeightQuantizer" in order:
            q = _fields(f"{at}.weight_quant", entry.get("weight_quant"), _WEIGHT_QUANT)
            _check_bits(f"{at}.weight_quant", q["bits"])
            if not 0 <= q["refit_iters"] <= 10_000 or q["refit"] not in ("epoch", "step", "never"):
                raise MicronetError(f"{at}.weight_quant: refit_iters must be in 0..10000, refit epoch/step/never")
        if "input_quant" in entry:
            q = _fields(f"{at}.input_quant", entry["input_quant"], _INPUT_QUANT)
            _check_bits(f"{at}.input_quant", q["bits"])
            if q["method"] not in ("max", "percentile", "mse") or not 0 < q["percentile"] <= 100:
                raise MicronetError(f"{at}.input_quant: method must be max/percentile/mse, percentile in (0, 100]")


def _parse_header(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """The JSON metadata fields, each parsed with bounded depth and checked against the schema above."""
    where = f"{path}: checkpoint metadata"
    header = {}
    for key in ("model", "layout", "history", "metrics", "extra"):
        if key not in metadata:
            raise MicronetError(f"{path} has malformed micronet metadata (no {key!r} field)")
        header[key] = parse_json(f"{where} {key!r}", metadata[key])
    spec = header["model"]
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"].strip():
        raise MicronetError(f"{where} 'model' must be a mapping with a model name")
    if isinstance(spec.get("num_classes"), bool) or not isinstance(spec.get("num_classes"), int):
        raise MicronetError(f"{where} 'model' needs an integer num_classes")
    _check_layout(where, header["layout"])
    if not isinstance(header["history"], list) or not all(isinstance(h, dict) for h in header["history"]):
        raise MicronetError(f"{where} 'history' must be a list of mappings")
    for key in ("metrics", "extra"):
        if not isinstance(header[key], dict):
            raise MicronetError(f"{where} {key!r} must be a mapping")
    return header


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed metadata of a micronet checkpoint (model, layout, history, metrics, extra), header only."""
    path = Path(path)
    return _parse_header(path, _micronet_metadata(path))


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file whose header ``safetensors_header`` has already validated."""
    st = _safetensors()
    try:
        return st.torch.load_file(str(path), device="cpu")
    except (st.SafetensorError, OSError) as exc:  # e.g. the file changed after its header was checked
        raise MicronetError(f"cannot read {path}: {first_line(exc)}") from None


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, allow_large: bool = False
         ) -> Checkpoint:
    """Load a micronet ``.safetensors`` checkpoint: validate header and metadata, check the model's size, then
    read the tensors, check the content hash, rebuild the model, its compression state and tensors."""
    path = Path(path)
    metadata = _micronet_metadata(path)
    header = _parse_header(path, metadata)  # schema first: the hash proves nothing about a crafted file
    spec = header["model"]
    check_model_budget(spec["name"], spec["num_classes"], allow_large=allow_large, source=str(path))
    tensors = _read_tensors(path)
    stored_hash = metadata.pop("content_sha256", None)
    if stored_hash != _content_hash(tensors, metadata):
        raise MicronetError(f"{path} failed its content hash check (corrupted or modified)")
    try:
        model = models.create(spec["name"], num_classes=spec["num_classes"])
        apply_layout(model, header["layout"])
    except MicronetError as exc:  # the messages name the model or module; say which file asked for it
        raise MicronetError(f"{path}: {exc}") from None
    extra_tensors = {k[len(EXTRA_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(EXTRA_PREFIX)}
    load_into(model, tensors, source=str(path), same_dtype=True)
    model.to(map_location)
    return Checkpoint(model, header["history"], header["metrics"], header["extra"], extra_tensors, path)


def _dtype_kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else "integer"


def load_into(model: nn.Module, state_dict: dict[str, Tensor], source: str = "state_dict", *,
              same_dtype: bool = False) -> nn.Module:
    """``load_state_dict(strict=True)`` with a one-line error naming missing/unexpected/mis-shaped keys and
    tensors of the wrong kind (an integer tensor for a float weight would load its bit patterns as values);
    ``same_dtype`` demands the exact dtype (micronet checkpoints store the model's own)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        def few(keys: list[str]) -> str:
            shown = [k if k.isprintable() and len(k) <= 120 else repr(k)[:120] for k in keys[:4]]  # one line
            return ", ".join(shown) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            shown = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]
            parts.append(f"shape mismatch: {few(shown)}")
        raise MicronetError(f"{source} does not match the architecture: " + "; ".join(parts))
    for key, tensor in own.items():
        got = state_dict[key].dtype
        if (got != tensor.dtype) if same_dtype else (_dtype_kind(got) != _dtype_kind(tensor.dtype)):
            raise MicronetError(f"{source}: {key} is {got}, the model needs {tensor.dtype}")
    model.load_state_dict(state_dict, strict=True)
    return model


def _unpickler_detail(message: str) -> str:
    """The informative line of torch's weights-only unpickling error (its text around it is generic advice)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Trying to load unsupported GLOBAL", "Unsupported", "Can only build")):
            return line[:160]
    return (lines[0] if lines else "unreadable")[:160]


class PickledObjectsError(MicronetError):
    """A weights file the safe unpickler refused because it holds Python objects (e.g. a whole model), not only
    tensors: what ``--trust-pickle`` is for."""


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of an untrusted file, zip sizes checked first; one-line errors."""
    if zipfile.is_zipfile(path):
        check_zip_archive(path)
    try:
        # An open file, not the path: torch.load hands any path ending in .safetensors to safetensors, bypassing
        # the header validation (files that start like safetensors never get here).
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        # An object the safe unpickler will not rebuild: torch names the refused GLOBAL somewhere in its message
        # (not always on the line _unpickler_detail picks for display).
        if "global" in str(exc).lower():
            raise PickledObjectsError(f"refused to load {path}: it contains objects other than tensors ({detail})"
                                      ) from None
        # Any other unpickling failure ("Unsupported operand 123", "Can only build Tensor...") means the bytes are
        # not a torch.save stream at all; the unpickler's wording would mean nothing to the user.
        raise MicronetError(f"{path} is not a weights file PyTorch can read (not saved by torch.save, or "
                            "damaged)") from None
    except (RuntimeError, EOFError, OSError, ValueError, OverflowError, MemoryError) as exc:
        raise MicronetError(f"cannot read {path} as a PyTorch state_dict (truncated or corrupted?): "
                            f"{first_line(exc)}") from None
    except (IndexError, KeyError, TypeError, AttributeError, AssertionError, NotImplementedError, struct_error) as exc:
        # torch's weights-only unpickler and zip reader raise these on damaged streams (a truncated opcode, a
        # storage key the archive lacks, a negative element count, "saved_id must be a tuple"): damaged input,
        # not a micronet bug.
        raise MicronetError(f"cannot read {path} as a PyTorch state_dict (damaged file: "
                            f"{type(exc).__name__}: {first_line(exc)})") from None


def _check_state(path: Path, obj: Any) -> dict[str, Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise MicronetError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    odd = next((k for k in obj if not k.isprintable() or len(k) > 1000), None)
    if odd is not None:  # no module has such a name; refuse it before it reaches a message or a model
        raise MicronetError(f"{path}: tensor name {odd[:80]!r} is not a module parameter name")
    for key, value in obj.items():
        if value.dtype not in TORCH_DTYPES:
            raise MicronetError(f"{path}: {key[:80]} has dtype {value.dtype}; only real floating, integer and "
                                "bool tensors are supported")
        if value.layout != torch.strided:
            raise MicronetError(f"{path}: {key[:80]} is a {value.layout} tensor; only dense tensors are supported")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a plain state_dict from ``.pt/.pth/.tar`` (weights_only, never unpickling code) or ``.safetensors``,
    refusing damaged files, non-string keys and tensors that are not real floating, integer or bool."""
    path = Path(path)
    if read_metadata(path) is not None:  # validates the safetensors header against the file
        return _check_state(path, _read_tensors(path))
    return _check_state(path, _torch_load(path))
