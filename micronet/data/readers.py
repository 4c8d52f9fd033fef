"""Safe readers for untrusted dataset files: restricted pickles, ``.npy`` and ``.npz`` without pickle.

Every failure becomes a one-line :class:`~micronet.errors.MicronetError` naming the file (and the key) and
what is wrong. Array sizes are checked against the file's own header and size *before* anything is
allocated, and dtypes, shapes and label ranges are validated, never silently cast.
"""

from __future__ import annotations

import io as _io
import pickle
import pickletools
import tokenize
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from micronet.errors import MicronetError

# No dataset micronet reads comes near this (CIFAR-10's train set is 150 MB); a header claiming more is a
# damaged or hostile file, refused before allocation.
MAX_ARRAY_BYTES = 4 * 2**30
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds only what CIFAR batches contain (dicts, lists, numpy arrays): no code runs."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol-5 pickles of arrays
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 store bytes this way
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


# Picklers number their memo entries 0, 1, 2, ...; an index far beyond the opcodes read so far makes the C
# unpickler grow its memo table to that size (a 90 KB file asking for 1.4 GB), so it is refused first.
MAX_PICKLE_OPCODES = 10_000_000


def _check_opcodes(data: bytes) -> None:
    """Walk the pickle's opcodes without running any (``pickletools.genops``): declared lengths must fit the file,
    memo indices must be plausible, the opcode count bounded."""
    for count, (op, arg, _) in enumerate(pickletools.genops(_io.BytesIO(data))):
        if count > MAX_PICKLE_OPCODES:
            raise pickle.UnpicklingError(f"more than {MAX_PICKLE_OPCODES:,} opcodes")
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and isinstance(arg, int) and arg > count:
            raise pickle.UnpicklingError(f"memo index {arg:,} at opcode {count:,} (a memo bomb?)")


def read_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR-style pickled dict through the restricted unpickler; bytes keys (Python-3 writers) become str."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        _check_opcodes(data)
        obj = ArrayUnpickler(_io.BytesIO(data), encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError,
            MemoryError, RecursionError, OverflowError, LookupError) as exc:
        # OverflowError: a FRAME length above 2**63; LookupError: a damaged encoding name for _codecs.encode.
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MicronetError(f"cannot read pickle {path}: {detail}") from None
    if not isinstance(obj, dict):
        raise MicronetError(f"{path} is not a CIFAR python batch (expected a dict, got {type(obj).__name__})")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(key, bytes):
            key = key.decode("latin1")
        if not isinstance(key, str):
            raise MicronetError(f"{path}: dict key {key!r} is not a string")
        out[key] = value
    return out


def _check_declared(path: Path, where: str, shape: tuple[int, ...], dtype: np.dtype, available: int) -> None:
    if dtype.hasobject:
        raise MicronetError(f"{where}: object arrays are not allowed (they need pickle)")
    declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if declared > MAX_ARRAY_BYTES:
        raise MicronetError(f"{where}: declares {declared:,} bytes, above the {MAX_ARRAY_BYTES:,}-byte limit")
    if declared != available:
        raise MicronetError(f"{where}: header declares {declared:,} bytes of data but {available:,} follow "
                            "(truncated or damaged file)")


def _npy_header(stream: Any, where: str) -> tuple[tuple[int, ...], np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(stream)
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = reader(stream)
    except (ValueError, EOFError, OSError, SyntaxError, TypeError, tokenize.TokenError) as exc:
        # numpy parses the header dict with Python's tokenizer and literal_eval: damaged text raises these.
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MicronetError(f"{where}: not a valid .npy array ({detail})") from None
    return tuple(shape), dtype


def read_npy(path: Path) -> np.ndarray:
    """One ``.npy`` array, loaded without pickle after its header is checked against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            shape, dtype = _npy_header(f, str(path))
            _check_declared(path, str(path), shape, dtype, size - f.tell())
            return np.load(path, allow_pickle=False)
    except OSError as exc:
        raise MicronetError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise MicronetError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else 'bad array'}") from None


def read_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an ``.npz`` file (others ignored), without pickle, each header checked first."""
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            for key in keys:
                info = members.get(f"{key}.npy")
                if info is None:
                    raise MicronetError(f"{path} lacks the key {key!r} (has {', '.join(_npz_keys(members))})")
                where = f"{path} key {key!r}"
                with archive.open(info) as member:
                    shape, dtype = _npy_header(member, where)
                    header = member.tell() if member.seekable() else None
                if header is not None:
                    _check_declared(path, where, shape, dtype, info.file_size - header)
                elif int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > MAX_ARRAY_BYTES:
                    raise MicronetError(f"{where}: declared size above the {MAX_ARRAY_BYTES:,}-byte limit")
                with archive.open(info) as member:
                    out[key] = np.lib.format.read_array(member, allow_pickle=False)
    except OSError as exc:
        raise MicronetError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MicronetError(f"cannot read {path}: {detail}") from None
    return out


def _npz_keys(members: dict[str, Any]) -> list[str]:
    return sorted(name.removesuffix(".npy") for name in members) or ["nothing"]


def as_images(where: str, value: Any, layout: str) -> Tensor:
    """uint8 ``N×3×32×32`` from ``N×32×32×3`` (``layout="nhwc"``) or CIFAR's planar ``N×3072`` rows."""
    expected = {"nhwc": "(N, 32, 32, 3)", "planar": "(N, 3072)"}[layout]
    if not isinstance(value, np.ndarray):
        raise MicronetError(f"{where}: expected a uint8 array of shape {expected}, got {type(value).__name__}")
    if value.dtype != np.uint8:
        raise MicronetError(f"{where}: expected dtype uint8, got {value.dtype}")
    shape = tuple(value.shape)
    ok = (len(shape) == 4 and shape[1:] == (32, 32, 3)) if layout == "nhwc" else (len(shape) == 2 and
                                                                                  shape[1] == 3072)
    if not ok:
        raise MicronetError(f"{where}: expected shape {expected}, got {shape}")
    images = torch.from_numpy(np.ascontiguousarray(value))
    images = images.permute(0, 3, 1, 2) if layout == "nhwc" else images.view(-1, 3, 32, 32)
    return images.contiguous()


def as_labels(where: str, value: Any, count: int, num_classes: int) -> Tensor:
    """int64 labels from an integer array or list of ``count`` values, each in ``0..num_classes-1``."""
    if isinstance(value, list | tuple):
        if not all(isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_) for v in value):
            raise MicronetError(f"{where}: labels must be integers")
        bad = [int(v) for v in value if not 0 <= int(v) < num_classes]  # before int64: 2**70 would overflow
        if bad:
            raise MicronetError(f"{where}: labels outside 0..{num_classes - 1} (found {min(bad)}..{max(bad)})")
        value = np.asarray(value, dtype=np.int64) if value else np.zeros(0, dtype=np.int64)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu":
        kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise MicronetError(f"{where}: labels must be an integer array, got {kind}")
    if value.ndim != 1 or value.shape[0] != count:
        raise MicronetError(f"{where}: expected {count} labels (one per image), got shape {tuple(value.shape)}")
    if count and (int(value.min()) < 0 or int(value.max()) >= num_classes):
        raise MicronetError(f"{where}: labels outside 0..{num_classes - 1} "
                            f"(found {int(value.min())}..{int(value.max())})")
    return torch.from_numpy(value.astype(np.int64))


def as_class_names(where: str, value: Any, num_classes: int) -> tuple[str, ...]:
    """``num_classes`` class names from a string array or list (bytes decoded)."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "US" and value.ndim == 1:
        value = value.tolist()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str | bytes) for v in value):
        raise MicronetError(f"{where}: label names must be a list of strings")
    names = tuple(v.decode("latin1") if isinstance(v, bytes) else v for v in value)
    if len(names) != num_classes:
        raise MicronetError(f"{where}: expected {num_classes} label names, got {len(names)}")
    return names
