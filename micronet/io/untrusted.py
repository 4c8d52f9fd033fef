"""The boundary for untrusted files: limits checked before allocation, and readers that fail in one line.

Every file micronet reads may be damaged or hostile (bit flips, truncated downloads, lying headers). The
rules here are checked *before* anything large is allocated or any model is built, and each failure is a
one-line :class:`~micronet.errors.MicronetError` naming the file and what is wrong. Documented limits:

* safetensors: header at most ``MAX_HEADER_BYTES``, at most ``MAX_TENSORS`` tensors, dtypes real floating,
  integer or bool only, shapes of at most ``MAX_DIMS`` non-negative integers, data offsets that cover the
  file's data section exactly (no gap, no overlap, nothing after), no duplicate keys;
* zip-based ``.pt`` files: declared sizes consistent with the archive, at most ``MAX_UNZIPPED_BYTES`` in all,
  at most ``MAX_ZIP_RATIO`` expansion per compressed member (torch itself stores members uncompressed);
* JSON and YAML files (recipes, policies): at most ``MAX_TEXT_BYTES`` of text; JSON and YAML text: nesting at most
  ``MAX_DEPTH``, at most ``MAX_NODES`` values once YAML aliases are expanded, no self-referencing aliases;
* models built from names found in files or given on the command line: at most ``MAX_PARAMS`` parameters in
  at most ``MAX_PARAM_TENSORS`` tensors (measured by building on the ``meta`` device, aborted as soon as the
  budget is passed), option values at most ``MAX_OPTION_VALUE``; ``allow_large=True`` (``--allow-large``)
  lifts both.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules.module import register_module_parameter_registration_hook

from micronet import models
from micronet.errors import MicronetError

MAX_HEADER_BYTES = 8 * 2**20  # micronet headers are a few hundred KB at most (safetensors allows 100 MB)
MAX_TENSORS = 50_000
MAX_DIMS = 8
MAX_UNZIPPED_BYTES = 8 * 2**30
MAX_ZIP_RATIO = 20
MAX_TEXT_BYTES = 256 * 2**10  # shipped recipes are ~2 KB; PyYAML parses ~1 MB/s, so this bounds the time
MAX_DEPTH = 32
MAX_NODES = 200_000
MAX_PARAMS = 100_000_000  # ~3x the zoo's largest model (wrn28_10: 36.5 M)
MAX_PARAM_TENSORS = 20_000  # the zoo's deepest model has 1,121
MAX_OPTION_VALUE = 10_000
MAX_CLASSES = 100_000

# Real floating, integer and bool (masks) dtypes; complex, float8 and unsigned >8-bit types are refused.
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1}
TORCH_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
                torch.int8, torch.uint8, torch.bool)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), at most 160 chars."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:160]


# ----------------------------------------------------------------------------------------------- JSON and YAML
def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"duplicate key {duplicate[:80]!r}")
    return out


def check_tree(where: str, tree: Any, max_nodes: int = MAX_NODES) -> None:
    """Refuse a parsed JSON/YAML tree nested deeper than ``MAX_DEPTH``, larger than ``max_nodes`` values once
    shared (aliased) nodes are counted each time they appear, or containing itself."""
    count = 0
    stack: list[tuple[Any, int, tuple[int, ...]]] = [(tree, 0, ())]
    while stack:
        node, depth, ancestors = stack.pop()
        count += 1
        if count > max_nodes:
            raise MicronetError(f"{where}: more than {max_nodes:,} values (an alias bomb?)")
        if depth > MAX_DEPTH:
            raise MicronetError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict | list):
            if id(node) in ancestors:
                raise MicronetError(f"{where}: a value contains itself (recursive alias)")
            children = list(node.values()) + list(node.keys()) if isinstance(node, dict) else node
            inner = (*ancestors, id(node))
            stack.extend((child, depth + 1, inner) for child in children)


def parse_json(where: str, text: str | bytes) -> Any:
    """JSON text parsed with duplicate keys refused and nesting bounded; one-line errors naming ``where``."""
    try:
        tree = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:  # json recurses once per nesting level
        raise MicronetError(f"{where}: JSON nested too deeply") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MicronetError(f"{where}: invalid JSON ({first_line(exc)})") from None
    check_tree(where, tree)
    return tree


def read_text(path: str | os.PathLike, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A small UTF-8 text file (recipe, policy), refused above ``max_bytes`` before reading it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise MicronetError(f"{what} {path} is {size:,} bytes, above the {max_bytes:,}-byte limit")
            return f.read(max_bytes + 1).decode("utf-8")
    except OSError as exc:
        raise MicronetError(f"cannot read {what} {path}: {exc.strerror or first_line(exc)}") from None
    except UnicodeDecodeError as exc:
        raise MicronetError(f"{what} {path} is not UTF-8 text ({first_line(exc)})") from None


def load_json_file(path: str | os.PathLike, what: str) -> Any:
    """A JSON file through :func:`read_text` and :func:`parse_json`."""
    return parse_json(f"{what} {path}", read_text(path, what))


@functools.lru_cache(maxsize=1)
def _yaml() -> tuple[Any, type]:
    """PyYAML and a ``SafeLoader`` (plain data only) that counts alias uses, so an alias bomb stops early.

    Imported on first use: only YAML files need it, and the GPU check runs micronet on bare machines without it.
    """
    import yaml

    class LimitedLoader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > 1_000:
                    raise yaml.YAMLError("more than 1,000 aliases")
            return super().compose_node(parent, index)

    return yaml, LimitedLoader


def _flow_depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting of YAML flow collections (quotes ignored: an over-estimate at worst)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(text):
        depth = depth + 1 if bracket in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


_BRACKETS = re.compile(r"[\[\]{}]")


def parse_yaml(where: str, text: str) -> Any:
    """YAML text with the safe loader, aliases bounded, nesting and expanded size checked."""
    # PyYAML's scanner is quadratic in the nesting of flow collections ("[[[[...": 1.5 s for 5,000 levels): refuse
    # deep flow nesting before parsing; the tree check below bounds block nesting.
    if _flow_depth(text) > 2 * MAX_DEPTH:
        raise MicronetError(f"{where}: YAML nested deeper than {MAX_DEPTH} levels")
    yaml, loader_class = _yaml()
    try:
        loader = loader_class(text)
        try:
            tree = loader.get_single_data()
        finally:
            loader.dispose()
    except RecursionError:  # the composer recurses once per nesting level
        raise MicronetError(f"{where}: YAML nested too deeply") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer of over 4300 digits
        raise MicronetError(f"{where}: invalid YAML ({first_line(exc)})") from None
    check_tree(where, tree)
    return tree


def load_yaml_file(path: str | os.PathLike, what: str) -> Any:
    """A YAML file through :func:`read_text` and :func:`parse_yaml`."""
    return parse_yaml(f"{what} {path}", read_text(path, what))


# ----------------------------------------------------------------------------------------------- safetensors
@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: dtype name, shape and byte range within the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _entry(where: str, key: str, value: Any) -> TensorEntry:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise MicronetError(f"{where}: tensor {key!r} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise MicronetError(f"{where}: tensor {key!r} has dtype {str(dtype)[:20]!r}; supported: "
                            f"{', '.join(SAFETENSORS_DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise MicronetError(f"{where}: tensor {key!r} has an invalid shape (at most {MAX_DIMS} non-negative ints)")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise MicronetError(f"{where}: tensor {key!r} has invalid data_offsets")
    if math.prod(shape) * SAFETENSORS_DTYPES[dtype] != offsets[1] - offsets[0]:
        raise MicronetError(f"{where}: tensor {key!r}: shape {tuple(shape)} of {dtype} does not match its "
                            f"{offsets[1] - offsets[0]:,} bytes")
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]] | None:
    """Validate a safetensors file's header against the file before any tensor is read.

    Returns (tensor entries, string metadata), or ``None`` if the file does not start like a safetensors file
    (a header length that leaves a JSON object); raises a one-line error for a damaged safetensors file."""
    path = Path(path)
    where = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(9)
            if len(prefix) < 9 or prefix[8:9] != b"{":
                return None  # not safetensors (a zip, a pickle, a truncated stub): other readers decide
            (length,) = struct.unpack("<Q", prefix[:8])
            if length > MAX_HEADER_BYTES:
                raise MicronetError(f"{where}: safetensors header claims {length:,} bytes, above the "
                                    f"{MAX_HEADER_BYTES:,}-byte limit (damaged file?)")
            if 8 + length > size:
                raise MicronetError(f"{where}: safetensors header claims {length:,} bytes but the file has only "
                                    f"{size - 8:,} after the length (truncated or corrupted?)")
            raw = prefix[8:] + f.read(length - 1)
    except OSError as exc:
        raise MicronetError(f"cannot read {where}: {exc.strerror or first_line(exc)}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MicronetError(f"{where}: safetensors header is not UTF-8 (damaged file?)") from None
    header = parse_json(f"{where} header", text)
    if not isinstance(header, dict):
        raise MicronetError(f"{where}: safetensors header is not a JSON object")
    if len(header) > MAX_TENSORS + 1:
        raise MicronetError(f"{where}: more than {MAX_TENSORS:,} tensors")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MicronetError(f"{where}: safetensors __metadata__ must map strings to strings")
    entries = {key: _entry(where, key, value) for key, value in header.items()}
    data_bytes, position = size - 8 - length, 0
    for key, entry in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.begin != position:
            raise MicronetError(f"{where}: tensor {key!r} starts at byte {entry.begin:,} of the data, expected "
                                f"{position:,} (overlapping or missing data)")
        position = entry.end
    if position != data_bytes:
        raise MicronetError(f"{where}: tensors cover {position:,} bytes but the file holds {data_bytes:,} "
                            "(truncated or corrupted file)")
    return entries, metadata


# ----------------------------------------------------------------------------------------------- zip (.pt)
def check_zip_archive(path: str | os.PathLike) -> None:
    """Refuse a zip-based ``.pt`` whose declared member sizes lie about the archive or expand like a zip bomb."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        # NotImplementedError: a damaged "version needed" or compression field
        raise MicronetError(f"cannot read {path} as a PyTorch zip file: {first_line(exc)}") from None
    if len(infos) > MAX_TENSORS + 16:
        raise MicronetError(f"{path}: more than {MAX_TENSORS:,} archive members")
    total = 0
    for info in infos:
        if info.compress_size > size or info.header_offset > size:
            raise MicronetError(f"{path}: member {info.filename[:80]!r} claims more bytes than the file holds")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise MicronetError(f"{path}: member {info.filename[:80]!r} declares inconsistent sizes")
        if info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1):
            raise MicronetError(f"{path}: member {info.filename[:80]!r} expands {info.file_size:,} bytes from "
                                f"{info.compress_size:,} (a zip bomb?)")
        total += info.file_size
    if total > MAX_UNZIPPED_BYTES:
        raise MicronetError(f"{path}: declares {total:,} bytes unpacked, above the {MAX_UNZIPPED_BYTES:,}-byte limit")


# ----------------------------------------------------------------------------------------------- model budget
class _OverBudget(Exception):
    """Raised inside a meta-device build the moment it passes the parameter budget."""


def check_model_budget(spec: str, num_classes: int = 100, *, allow_large: bool = False, source: str = "") -> None:
    """Refuse a zoo spec whose network would exceed ``MAX_PARAMS`` parameters (or ``MAX_PARAM_TENSORS``
    tensors, or options above ``MAX_OPTION_VALUE``) unless ``allow_large``; built on ``meta``, so nothing is
    allocated and the build stops as soon as the budget is passed. Names outside the zoo are left to the caller."""
    try:
        _check_budget(spec, num_classes, allow_large, f"{source}: " if source else "")
    except MicronetError as exc:
        if source and source not in str(exc):
            raise MicronetError(f"{source}: {exc}") from None
        raise


def _check_budget(spec: str, num_classes: int, allow_large: bool, where: str) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
        raise MicronetError(f"{where}num_classes must be an integer in 1..{MAX_CLASSES:,}, got {num_classes!r}")
    if allow_large:
        return
    name, options = models.parse_spec(spec)
    for key, value in options.items():
        if not isinstance(value, bool) and not abs(value) <= MAX_OPTION_VALUE:  # also refuses nan
            raise MicronetError(f"{where}model option {key}={value} is above the limit of {MAX_OPTION_VALUE:,}; "
                                "pass --allow-large (allow_large=True) to build it anyway")
    if not options and num_classes <= 1000 and name in models.zoo():
        return  # a zoo preset as published: all are far below the budget (wrn28_10, the largest, has 36.5 M)
    try:
        models.resolve(name)
    except KeyError:
        return  # not a zoo name: models.create / the caller reports it
    counted = [0, 0]

    def count(module: torch.nn.Module, key: str, param: torch.nn.Parameter | None) -> None:
        if param is not None:
            counted[0] += param.numel()
            counted[1] += 1
            if counted[0] > MAX_PARAMS or counted[1] > MAX_PARAM_TENSORS:
                raise _OverBudget

    handle = register_module_parameter_registration_hook(count)
    try:
        with torch.device("meta"):
            models.create(spec, num_classes=num_classes)
    except _OverBudget:
        raise MicronetError(f"{where}model {spec[:120]!r} has more than {MAX_PARAMS:,} parameters (or "
                            f"{MAX_PARAM_TENSORS:,} parameter tensors); pass --allow-large (allow_large=True) "
                            "to build it anyway") from None
    finally:
        handle.remove()
