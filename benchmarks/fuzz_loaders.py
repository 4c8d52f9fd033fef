"""Fuzz every file reader micronet has with mutated valid files; count how each mutant ends.

Targets (one valid seed file each, built here): micronet checkpoints, plain ``.pt`` state_dicts, riair2019
files, CIFAR pickles, ``.npz``/``.npy`` arrays, image folders, recipes, augmentation policy JSON, scoring policy
YAML and training resume state. Mutants: byte flips (header and body), interesting bytes, truncation at any
offset, chunk deletion/duplication/insertion, header-length lies, dtype/shape/offset lies, duplicate keys,
wrong metadata types (with the content hash recomputed, as an attacker would), huge declared sizes, alias
bombs, deep nesting. Every mutant must end as

* ``clean``: a one-line ``MicronetError`` that names the file, or
* ``success``: a correct result (for micronet checkpoints: exactly the tensors the file holds, and the
  original ones unless the mutant recomputed the content hash; elsewhere a well-formed, validated result),

never as ``traceback`` (any other exception, a multi-line message, or an error not naming the file),
``wrong`` (a success with a wrong result) or ``hang`` (longer than ``--timeout`` seconds).

    python benchmarks/fuzz_loaders.py --mutants 3000 --seed 0 [--targets micronet,recipe] [--json]

The test suite (tests/io/test_fuzz.py) runs the same targets and mutators with a fixed number of
hypothesis-drawn examples.
"""

from __future__ import annotations

import argparse
import contextlib
import io as _io
import json
import math
import pickle
import random
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from micronet import io, models
from micronet.compress import QuantConfig, SparsityConfig, freeze_masks_, prune_, quantize_
from micronet.data import load_dataset
from micronet.errors import MicronetError
from micronet.io.checkpoint import _content_hash, _read_tensors
from micronet.io.riair2019 import random_riair2019_state
from micronet.io.untrusted import parse_json
from micronet.scoring.policy import Policy as ScorePolicy
from micronet.scoring.policy import resolve_policy
from micronet.training.augment import POLICY_DIR, load_policy
from micronet.training.augment import AugmentPolicy as AugPolicy
from micronet.training.loop import check_training_state, restore_state, resume_state
from micronet.training.recipe import RECIPE_DIR, Recipe, load_recipe

SPEC = "densenet_bc:depth=10,growth=4"
OUTCOMES = ("clean", "success", "traceback", "wrong", "hang")

# ----------------------------------------------------------------------------------------------- mutators
INTERESTING_BYTES = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0x22, 0x7B, 0x7D, 0x5B, 0x5D, 0x2C, 0x3A, 0x0A, 0x20)
INTERESTING_INTS = (0, 1, -1, -3, 2, 7, 100, 255, 256, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**64, 2**70, -(2**63),
                    10**12, 100_000, 100_000_000)


def mutate_bytes(data: bytes, rng: random.Random, hot: int = 1024) -> tuple[str, bytes]:
    """One random byte-level mutation; half of the positions fall in the first ``hot`` bytes (the header)."""
    def pos(limit: int | None = None) -> int:
        n = len(data) if limit is None else min(limit, len(data))
        return rng.randrange(max(n, 1))

    def where() -> int:
        return pos(hot) if rng.random() < 0.5 else pos()

    buf = bytearray(data)
    kind = rng.choice(("flip", "flip", "byte", "truncate", "delete", "insert", "duplicate", "zero"))
    if not buf:
        return "empty", b""
    if kind == "flip":
        for _ in range(rng.choice((1, 1, 2, 4, 8, 32))):
            i = where()
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == "byte":
        for _ in range(rng.choice((1, 2, 4))):
            buf[where()] = rng.choice(INTERESTING_BYTES)
    elif kind == "truncate":
        del buf[where():]
    elif kind == "delete":
        i = where()
        del buf[i:i + rng.choice((1, 2, 8, 64, 4096))]
    elif kind == "insert":
        i = where()
        buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 8, 64))))
    elif kind == "duplicate":
        i = where()
        buf[i:i] = buf[i:i + rng.choice((1, 8, 64, 512))]
    else:
        i = where()
        buf[i:i + rng.choice((4, 8, 64))] = bytes(len(buf[i:i + 8]))
    return f"bytes:{kind}", bytes(buf)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """An 'interesting' JSON/YAML value: wrong types, extreme numbers, deep or large containers."""
    choice = rng.randrange(14)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice((True, False))
    if choice == 2:
        return rng.choice(INTERESTING_INTS)
    if choice == 3:
        return rng.choice((0.5, -0.0, 1e308, -1e308, 1e-300, 3.7))
    if choice == 4:
        return rng.choice(("", "x", "../../etc/passwd", "a" * 10_000, "null", "1e999", "\u00e9\u4e2d", "max"))
    if choice == 5:
        return []
    if choice == 6:
        return {}
    if choice == 7:  # deep nesting
        value: Any = 0
        for _ in range(rng.choice((40, 200, 5000))):
            value = [value]
        return value
    if choice == 8:
        return list(range(rng.choice((3, 1000))))
    if choice == 9 and depth < 2:
        return {rng.choice(("a", "name", "1", "")): random_value(rng, depth + 1) for _ in range(2)}
    if choice == 10 and depth < 2:
        return [random_value(rng, depth + 1) for _ in range(3)]
    if choice == 11:
        return [0, 0]
    if choice == 12:
        return rng.choice((-3, 0, 100, 33))
    return "densenet_bc:depth=100000000"


def _paths(tree: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree[:50]):
            yield from _paths(v, (*prefix, i))


def mutate_tree(tree: Any, rng: random.Random) -> tuple[str, Any]:
    """Replace, delete or add one value at a random place of a JSON-like tree (on a deep copy)."""
    tree = json.loads(json.dumps(tree))
    paths = list(_paths(tree))
    path = rng.choice(paths)
    if not path:
        return "tree:root", random_value(rng)
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    action = rng.choice(("replace", "replace", "replace", "delete", "add"))
    if action == "delete":
        del parent[path[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[rng.choice(("unknown", "__metadata__", "name", "1"))] = random_value(rng)
    else:
        parent[path[-1]] = random_value(rng)
    return f"tree:{action}", tree


def _json_dumps(tree: Any) -> str:
    try:
        return json.dumps(tree)
    except (ValueError, RecursionError):
        return "[" * 5000 + "]" * 5000


def mutate_text(text: str, rng: random.Random) -> tuple[str, str]:
    """A line-level text mutation (for YAML/JSON files): duplicate, delete, swap or garble a line."""
    lines = text.splitlines()
    i = rng.randrange(len(lines))
    kind = rng.choice(("dup", "delete", "swap", "garble", "indent"))
    if kind == "dup":
        lines.insert(i, lines[i])
    elif kind == "delete":
        del lines[i]
    elif kind == "swap":
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == "garble":
        line = list(lines[i] or " ")
        line[rng.randrange(len(line))] = rng.choice(":-[]{}&*!|>'\"#%@`,? \t\\")
        lines[i] = "".join(line)
    else:
        lines[i] = "  " * rng.randrange(1, 4) + lines[i]
    return f"text:{kind}", "\n".join(lines) + "\n"


YAML_BOMBS = {
    "laughs": "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)) + "model: x\n",
    "recursive": "model: &m [*m]\nstages: &s {prune: *s}\n",
    "deep": "model: " + "[" * 5000 + "]" * 5000 + "\n",
    "deep-block": "".join("  " * i + f"k{i}:\n" for i in range(300)),
    "tag": "model: !!python/object/apply:os.system ['echo pwned']\n",
    "binary": "model: !!binary aGVsbG8=\n",
    "huge-int": "seed: " + "9" * 5000 + "\n",
}


# ----------------------------------------------------------------------------------------------- targets
class Target:
    """A file format: valid seed files, mutants of them, and how to load and judge one."""

    name = ""
    suffix = ""

    def setup(self, workdir: Path) -> None:
        """Build the seed file(s) under ``workdir``."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)

    def mutate(self, rng: random.Random) -> tuple[str, bytes]:
        """One mutant of the seed: (kind, file bytes)."""
        if rng.random() < 0.5 or not self.structured:
            return mutate_bytes(self.seed, rng, self.hot)
        return rng.choice(self.structured)(rng)

    hot = 1024
    seed = b""
    structured: list[Callable[[random.Random], tuple[str, bytes]]] = []

    def place(self, data: bytes) -> Path:
        """Write the mutant where the loader will look; returns the path named in error messages."""
        path = self.workdir / f"mutant{self.suffix}"
        path.write_bytes(data)
        return path

    def load(self, path: Path) -> Any:
        raise NotImplementedError

    def correct(self, result: Any, data: bytes, kind: str) -> bool:
        raise NotImplementedError


class MicronetTarget(Target):
    name, suffix = "micronet", ".safetensors"

    def setup(self, workdir: Path) -> None:
        super().setup(workdir)
        torch.manual_seed(0)
        model = models.create(SPEC)
        prune_(model, SparsityConfig(0.75))
        quantize_(model, QuantConfig(weight_bits=4, act_bits=4, fc_weight_bits=6),
                  calibration_data=torch.randn(4, 3, 32, 32))
        freeze_masks_(model)
        self.seed = io.save(workdir / "seed.safetensors", model.eval(), history=[{"stage": "quant"}],
                            metrics={"top1": 1.0}, extra={"normalization": "cifar100"}).read_bytes()
        self.original = {k: v.clone() for k, v in model.state_dict().items()}
        (length,) = struct.unpack("<Q", self.seed[:8])
        self.hot = 8 + length
        self.header = json.loads(self.seed[8:8 + length])
        self.body = self.seed[8 + length:]
        self.structured = [self.length_lie, self.header_edit, self.duplicate_key, self.rehashed_metadata,
                           self.rehashed_dtype, self.rehashed_value, self.huge_sizes]

    def _with_header(self, header: Any, text: str | None = None, body: bytes | None = None) -> bytes:
        raw = (text if text is not None else _json_dumps(header)).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + (self.body if body is None else body)

    def length_lie(self, rng: random.Random) -> tuple[str, bytes]:
        value = rng.choice((0, 1, 2, self.hot - 9, self.hot - 7, self.hot + 1, len(self.seed), 2**63, 2**64 - 1,
                            100 * 2**30, rng.randrange(2**64)))
        return "length-lie", struct.pack("<Q", value) + self.seed[8:]

    def header_edit(self, rng: random.Random) -> tuple[str, bytes]:
        header = json.loads(json.dumps(self.header))
        key = rng.choice([k for k in header if k != "__metadata__"])
        entry = header[key]
        field = rng.choice(("dtype", "shape", "data_offsets", "tree"))
        if field == "dtype":
            entry["dtype"] = rng.choice(("F32", "I32", "F64", "BOOL", "C64", "F8_E4M3", "U16", "U64", "x", 5))
        elif field == "shape":
            entry["shape"] = rng.choice(([10**12], [-1], [2**63], [1.5], [], [0], entry["shape"] * 2,
                                         [*entry["shape"], 1], "3", [True]))
        elif field == "data_offsets":
            b, e = entry["data_offsets"]
            entry["data_offsets"] = rng.choice(([b, e + 4], [b - 4, e], [e, b], [0, 2**64], [b, 2**62], [-1, e],
                                                [b], [b, e, 0], [str(b), e]))
        else:
            return "header:" + mutate_tree(header, rng)[0], self._with_header(mutate_tree(header, rng)[1])
        return f"header:{field}", self._with_header(header)

    def duplicate_key(self, rng: random.Random) -> tuple[str, bytes]:
        text = json.dumps(self.header)
        key = rng.choice(list(self.header))
        dup = json.dumps({key: self.header[key]})[1:-1]
        return "duplicate-key", self._with_header(None, text[:-1] + ", " + dup + "}")

    def _rehashed(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
        metadata = {k: v for k, v in metadata.items() if k != "content_sha256"}
        metadata["content_sha256"] = _content_hash(tensors, metadata)
        return st_save(tensors, metadata=metadata)

    def rehashed_metadata(self, rng: random.Random) -> tuple[str, bytes]:
        """Wrong metadata with a valid hash: what anyone can write, so the schema must catch it."""
        tensors, metadata = st_load(self.seed), dict(self.header["__metadata__"])
        field = rng.choice(("model", "model", "layout", "layout", "history", "metrics", "extra", "micronet_format"))
        if field == "micronet_format":
            metadata.pop(field) if rng.random() < 0.5 else metadata.update({field: "2"})
            return "rehash:format", self._rehashed(tensors, metadata)
        tree = json.loads(metadata[field])
        if field == "model" and rng.random() < 0.5:
            tree["name"] = rng.choice(("densenet_bc:depth=100000000", "wrn:depth=10000", "densenet_bc:depth=10000",
                                       "densenet_bc:depth=5", "densenet_bc:depth=-3", "nope", "",
                                       "densenet_bc:growth=1e30", "wrn:width=nan", "densenet_bc:depth=10,growth=0"))
            tree["num_classes"] = rng.choice((tree["num_classes"], 0, -1, 2**40, True, 1.5, "100"))
        elif field == "layout" and rng.random() < 0.5:
            name = rng.choice(list(tree))
            entry = tree[name]
            sub = rng.choice([k for k in entry if k != "order"] or ["order"])
            if isinstance(entry.get(sub), dict):
                k = rng.choice(list(entry[sub]))
                entry[sub][k] = rng.choice((0, 100, -3, 33, [0, 0], None, "x", 1.5, True, 2**70))
            else:
                entry[sub] = random_value(rng)
        else:
            tree = mutate_tree(tree, rng)[1]
        metadata[field] = _json_dumps(tree)
        return f"rehash:{field}", self._rehashed(tensors, metadata)

    def rehashed_dtype(self, rng: random.Random) -> tuple[str, bytes]:
        tensors, metadata = st_load(self.seed), dict(self.header["__metadata__"])
        key = rng.choice([k for k, v in tensors.items() if v.dtype == torch.float32 and v.numel()])
        tensors[key] = tensors[key].view(rng.choice((torch.int32, torch.float32))).clone() if rng.random() < 0.7 else \
            tensors[key].to(rng.choice((torch.float64, torch.float16, torch.int64)))
        return "rehash:dtype", self._rehashed(tensors, metadata)

    def rehashed_value(self, rng: random.Random) -> tuple[str, bytes]:
        tensors, metadata = st_load(self.seed), dict(self.header["__metadata__"])
        key = rng.choice([k for k, v in tensors.items() if v.dtype == torch.float32 and v.numel()])
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = rng.choice((float("nan"), 1e30, -1.0, 0.0))
        if rng.random() < 0.3:
            tensors[key] = tensors[key].reshape(-1)  # right values, wrong shape for the model
        return "rehash:value", self._rehashed(tensors, metadata)

    def huge_sizes(self, rng: random.Random) -> tuple[str, bytes]:
        header = json.loads(json.dumps(self.header))
        n = rng.choice((10**6, 2 * 10**5))
        if rng.random() < 0.5:  # many tiny tensors
            for i in range(n):
                header[f"t{i}"] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
        else:
            key = rng.choice([k for k in header if k != "__metadata__"])
            header[key]["shape"] = [2**20, 2**20, 2**20]
            header[key]["data_offsets"] = [header[key]["data_offsets"][0], 2**62]
        return "huge-sizes", self._with_header(header)

    def load(self, path: Path) -> Any:
        return io.load_model(path)

    def correct(self, model: Any, data: bytes, kind: str) -> bool:
        held = {k: v for k, v in st_load(data).items() if not k.startswith("__extra__.")}
        state = model.state_dict()
        same_as_file = set(state) == set(held) and all(_same(state[k], held[k]) for k in held)
        if kind.startswith("rehash:"):
            return same_as_file
        return same_as_file and all(_same(state[k], self.original[k]) for k in self.original)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN payloads included): dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().cpu().contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _zip_with(data: bytes, edit: Callable[[zipfile.ZipInfo, bytes], tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    out = _io.BytesIO()
    with zipfile.ZipFile(_io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            new, payload = edit(info, src.read(info))
            dst.writestr(new, payload)
    return out.getvalue()


class StateDictTarget(Target):
    name, suffix = "state_dict", ".pt"

    def setup(self, workdir: Path) -> None:
        super().setup(workdir)
        torch.manual_seed(0)
        self.model_state = models.create(SPEC).state_dict()
        self.seed = self._save(self.model_state)
        self.structured = [self.weird_object, self.zip_bomb, self.zip_size_lie, self.tensor_edit]

    @staticmethod
    def _save(obj: Any) -> bytes:
        buf = _io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    def weird_object(self, rng: random.Random) -> tuple[str, bytes]:
        state = dict(self.model_state)
        key = rng.choice(list(state))
        choice = rng.randrange(7)
        if choice == 0:
            state[5] = state.pop(key)
        elif choice == 1:
            state[key] = torch.complex(state[key].float(), state[key].float())
        elif choice == 2:
            return "object:list", self._save(list(state.values()))
        elif choice == 3:
            return "object:nested", self._save({"state_dict": {"a": {"b": state[key]}}})
        elif choice == 4:
            state[key] = state[key].to(torch.int32)
        elif choice == 5:
            state[key] = state[key].to_sparse() if state[key].dim() >= 1 else state[key]
        else:
            class Evil:
                def __reduce__(self):
                    return (print, ("payload ran",))
            return "object:pickle-global", pickle.dumps({"a": Evil()})
        return f"object:{choice}", self._save(state)

    def zip_bomb(self, rng: random.Random) -> tuple[str, bytes]:
        def edit(info: zipfile.ZipInfo, payload: bytes) -> tuple[zipfile.ZipInfo, bytes]:
            if info.filename.endswith("/data/0"):
                info.compress_type = zipfile.ZIP_DEFLATED
                return info, bytes(rng.choice((2**20, 16 * 2**20)))
            return info, payload
        return "zip:bomb", _zip_with(self.seed, edit)

    def zip_size_lie(self, rng: random.Random) -> tuple[str, bytes]:
        buf = bytearray(self.seed)
        eocd = buf.rfind(b"PK\x05\x06")
        cd = struct.unpack("<I", buf[eocd + 16:eocd + 20])[0]
        entries, i = [], cd
        while buf[i:i + 4] == b"PK\x01\x02":
            entries.append(i)
            n, m, k = struct.unpack("<HHH", buf[i + 28:i + 34])
            i += 46 + n + m + k
        at = rng.choice(entries)
        field = rng.choice((20, 24, 42))  # compressed size, uncompressed size, local header offset
        buf[at + field:at + field + 4] = struct.pack("<I", rng.choice((0, 1, 2**31, 2**32 - 1, 12345)))
        return "zip:size-lie", bytes(buf)

    def tensor_edit(self, rng: random.Random) -> tuple[str, bytes]:
        state = dict(self.model_state)
        key = rng.choice(list(state))
        state[key] = rng.choice((torch.zeros(3), state[key].reshape(-1), torch.full_like(state[key].float(), math.nan)))
        if rng.random() < 0.3:
            state.pop(rng.choice(list(state)))
        return "tensor-edit", self._save(state)

    def load(self, path: Path) -> Any:
        return io.load_model(path, model=SPEC)

    def correct(self, model: Any, data: bytes, kind: str) -> bool:
        state = model.state_dict()  # plain state_dicts carry no hash: changed values may load, structure may not
        return set(state) == set(self.model_state) and all(
            state[k].shape == self.model_state[k].shape and state[k].dtype == self.model_state[k].dtype for k in state)


class RiairTarget(StateDictTarget):
    name, suffix = "riair2019", ".pth"

    def setup(self, workdir: Path) -> None:
        Target.setup(self, workdir)
        self.model_state = random_riair2019_state(0)
        self.seed = self._save(self.model_state)
        self.structured = [self.weird_object, self.zip_size_lie, self.tensor_edit, self.codes]

    def codes(self, rng: random.Random) -> tuple[str, bytes]:
        state = dict(self.model_state)
        key = rng.choice([k for k in state if "conv" in k or k == "fc.weight"])
        state[key] = state[key].clone()
        state[key].view(-1)[0] = rng.choice((0.5, 1000.0, math.inf, math.nan, -9.0))
        return "codes", self._save(state)

    def load(self, path: Path) -> Any:
        return io.load_model(path)

    def correct(self, model: Any, data: bytes, kind: str) -> bool:
        return isinstance(model, torch.nn.Module) and type(model).__name__ == "RiairDenseNet"


class CifarTarget(Target):
    name, suffix = "cifar_pickle", ""

    def setup(self, workdir: Path) -> None:
        super().setup(workdir)
        self.base = workdir / "cifar-10-batches-py"
        self.base.mkdir()
        rng = np.random.default_rng(0)
        self.batch = {"batch_label": "testing batch 1 of 1", "labels": [int(v) for v in rng.integers(0, 10, 20)],
                      "data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                      "filenames": [f"t{i}.png" for i in range(20)]}
        self.seed = pickle.dumps(self.batch, protocol=2)
        for name in [f"data_batch_{i}" for i in range(1, 6)]:
            (self.base / name).write_bytes(self.seed)
        (self.base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
        self.hot = 256
        self.structured = [self.wrong_values]

    def wrong_values(self, rng: random.Random) -> tuple[str, bytes]:
        batch = dict(self.batch)
        choice = rng.randrange(10)
        if choice == 0:
            batch["data"] = "not pixels"
        elif choice == 1:
            batch["labels"] = [str(v) for v in batch["labels"]]
        elif choice == 2:
            batch["labels"] = [2**70] + batch["labels"][1:]
        elif choice == 3:
            batch["data"] = batch["data"].astype(np.float32) * 300
        elif choice == 4:
            batch["labels"] = [v + 0.5 for v in batch["labels"]]
        elif choice == 5:
            batch["labels"] = batch["labels"][:-1]
        elif choice == 6:
            batch["data"] = batch["data"].astype(np.int64) - 5
        elif choice == 7:
            batch.pop(rng.choice(("data", "labels")))
        elif choice == 8:
            batch["data"] = batch["data"].reshape(20, 32, 96)
        else:
            batch = [batch]  # type: ignore[assignment]
        return f"values:{choice}", pickle.dumps(batch, protocol=rng.choice((2, 4, 5)))

    def place(self, data: bytes) -> Path:
        path = self.base / "test_batch"
        path.write_bytes(data)
        return path

    def load(self, path: Path) -> Any:
        return load_dataset(self.workdir, "test", "cifar10")

    def correct(self, result: Any, data: bytes, kind: str) -> bool:
        return (result.images.dtype == torch.uint8 and tuple(result.images.shape[1:]) == (3, 32, 32)
                and len(result.labels) == len(result.images)
                and bool(((result.labels >= 0) & (result.labels < 10)).all()))


class NpzTarget(Target):
    name, suffix = "npz", ".npz"

    def setup(self, workdir: Path) -> None:
        super().setup(workdir)
        rng = np.random.default_rng(0)
        buf = _io.BytesIO()
        np.savez(buf, images=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
                 labels=rng.integers(0, 10, 20), label_names=np.array([f"c{i}" for i in range(10)]))
        self.seed = buf.getvalue()
        (workdir / "cifar102_train.npz").write_bytes(self.seed)
        self.hot = 400
        self.structured = [self.object_array, self.header_lie]

    def object_array(self, rng: random.Random) -> tuple[str, bytes]:
        buf = _io.BytesIO()
        labels = rng.choice((np.array([{"a": 1}] * 20, dtype=object), np.zeros(20, dtype=np.float32),
                             np.full(20, 2**40), np.zeros((20, 2), dtype=np.int64)))
        np.savez(buf, images=np.zeros((20, 32, 32, 3), dtype=np.uint8), labels=labels)
        return "npz:values", buf.getvalue()

    def header_lie(self, rng: random.Random) -> tuple[str, bytes]:
        old = b"'shape': (20, 32, 32, 3)"
        new = rng.choice((b"'shape': (99999999, 32, 32, 3)", b"'shape': (20, 32, 32, 4)", b"'shape': (-1, 32, 32, 3)",
                          b"'shape': (20, 32, 32, 3, 1)"))
        return "npz:header-lie", _zip_with(self.seed, lambda info, payload: (info, payload.replace(old, new[:len(old)]
                                                                                                  .ljust(len(old)))))

    def place(self, data: bytes) -> Path:
        path = self.workdir / "cifar102_test.npz"
        path.write_bytes(data)
        return path

    def load(self, path: Path) -> Any:
        return load_dataset(self.workdir, "test", "cifar102")

    correct = CifarTarget.correct


class NpyTarget(Target):
    name, suffix = "npy", ".npy"

    def setup(self, workdir: Path) -> None:
        super().setup(workdir)
        rng = np.random.default_rng(0)
        buf = _io.BytesIO()
        np.save(buf, rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
        self.seed = buf.getvalue()
        np.save(workdir / "cifar10.1_v6_labels.npy", rng.integers(0, 10, 20))
        self.hot = 128

    def place(self, data: bytes) -> Path:
        path = self.workdir / "cifar10.1_v6_data.npy"
        path.write_bytes(data)
        return path

    def load(self, path: Path) -> Any:
        return load_dataset(self.workdir, "test", "cifar101")

    correct = CifarTarget.correct


def _png(width: int, height: int, pixels: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    raw = b"".join(b"\x00" + pixels[y * width * 3:(y + 1) * width * 3] for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


class ImageTarget(Target):
    name, suffix = "image_folder", ".png"

    def setup(self, workdir: Path) -> None:
        super().setup(workdir)
        rng = random.Random(0)
        for split in ("training_set", "test_set"):
            for c in ("a", "b"):
                (workdir / split / c).mkdir(parents=True)
                for i in range(2):
                    (workdir / split / c / f"{i}.png").write_bytes(_png(32, 32, rng.randbytes(32 * 32 * 3)))
        self.seed = (workdir / "training_set" / "a" / "0.png").read_bytes()
        self.hot = 64
        self.structured = [self.bomb]

    def bomb(self, rng: random.Random) -> tuple[str, bytes]:
        width, height = rng.choice(((20000, 20000), (1, 10**6), (33, 32), (0, 32), (2**31 - 1, 1)))
        header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        ihdr = struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
        return "png:dimensions", self.seed[:8] + ihdr + self.seed[8 + 25:]

    def place(self, data: bytes) -> Path:
        path = self.workdir / "training_set" / "a" / "0.png"
        path.write_bytes(data)
        return path

    def load(self, path: Path) -> Any:
        return load_dataset(self.workdir, "train", "folder")

    def correct(self, result: Any, data: bytes, kind: str) -> bool:
        return result.images.dtype == torch.uint8 and tuple(result.images.shape) == (4, 3, 32, 32)


class TextTarget(Target):
    """A YAML/JSON text file: line mutations, tree mutations, bombs."""

    def mutate(self, rng: random.Random) -> tuple[str, bytes]:
        r = rng.random()
        if r < 0.25:
            return mutate_bytes(self.seed, rng, 256)
        if r < 0.5:
            kind, text = mutate_text(self.seed.decode(), rng)
            return kind, text.encode()
        if r < 0.9:
            kind, tree = mutate_tree(self.tree, rng)
            return kind, self.dump(tree).encode()
        name = rng.choice(sorted(YAML_BOMBS))
        return f"bomb:{name}", YAML_BOMBS[name].encode()

    def dump(self, tree: Any) -> str:
        try:
            return yaml.safe_dump(tree)
        except (RecursionError, yaml.YAMLError):
            return YAML_BOMBS["deep"]


class RecipeTarget(TextTarget):
    name, suffix = "recipe", ".yaml"

    def setup(self, workdir: Path) -> None:
        super().setup(workdir)
        self.seed = (RECIPE_DIR / "micronet2019-densenet.yaml").read_bytes()
        self.tree = yaml.safe_load(self.seed)
        self.structured = []

    def mutate(self, rng: random.Random) -> tuple[str, bytes]:
        if rng.random() < 0.1:
            tree = json.loads(json.dumps(self.tree))
            key, value = rng.choice((("name", "../../escape"), ("name", "/abs"), ("name", ".."), ("name", 5),
                                     ("augment", {"crop_padding": 100000}), ("augment", {"cutout": 2**70}),
                                     ("augment", {"ops_per_image": 10**9}), ("data", "cifar"), ("seed", "x"),
                                     ("model", ["x"]), ("augment", {"policy": ["x"]}), ("stages", {1: {}}),
                                     ("augment", {"policy": "a\0b"})))
            tree[key] = {**tree[key], **value} if isinstance(value, dict) and isinstance(tree.get(key), dict) else value
            return f"recipe:{key}", yaml.safe_dump(tree).encode()
        return super().mutate(rng)

    def load(self, path: Path) -> Any:
        return load_recipe(path)

    def correct(self, result: Any, data: bytes, kind: str) -> bool:
        runs = Path("runs").resolve()
        return isinstance(result, Recipe) and (runs / result.name).resolve().parent == runs


class AugPolicyTarget(TextTarget):
    name, suffix = "aug_policy", ".json"

    def setup(self, workdir: Path) -> None:
        super().setup(workdir)
        self.seed = (POLICY_DIR / "micronet2019.json").read_bytes()
        self.tree = json.loads(self.seed)

    def dump(self, tree: Any) -> str:
        return _json_dumps(tree)

    def load(self, path: Path) -> Any:
        return load_policy(path)

    def correct(self, result: Any, data: bytes, kind: str) -> bool:
        return isinstance(result, AugPolicy) and len(result.subpolicies) > 0


class ScorePolicyTarget(TextTarget):
    name, suffix = "score_policy", ".yaml"

    def setup(self, workdir: Path) -> None:
        super().setup(workdir)
        self.seed = b"base: riair2019-t4\naccumulator: int_tree_final\nmask: cheapest\nfloat_bits: 16\n"
        self.tree = yaml.safe_load(self.seed)

    def load(self, path: Path) -> Any:
        return resolve_policy(str(path))

    def correct(self, result: Any, data: bytes, kind: str) -> bool:
        return isinstance(result, ScorePolicy)


class ResumeTarget(Target):
    """Resume state as a stage checkpoint holds it: optimizer/RNG tensors plus the JSON record."""

    name, suffix = "resume", ".safetensors"

    def setup(self, workdir: Path) -> None:
        super().setup(workdir)
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
        self.net(torch.randn(2, 3, 8, 8))
        optimizer = self._optimizer()
        self.net(torch.randn(2, 3, 8, 8)).sum().backward()
        optimizer.step()
        tensors, meta = resume_state(optimizer)
        self.record = {"optimizer": meta, "epochs_done": 1, "step": 10}
        self.seed = st_save({k: v.contiguous() for k, v in tensors.items()},
                            metadata={"training": json.dumps(self.record)})
        self.structured = [self.edit_tensors, self.edit_record]

    def _optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def edit_tensors(self, rng: random.Random) -> tuple[str, bytes]:
        tensors = st_load(self.seed)
        key = rng.choice(list(tensors))
        choice = rng.randrange(5)
        if choice == 0:
            tensors.pop(key)
        elif choice == 1:
            tensors[key] = tensors[key].reshape(-1)[:-1].clone() if tensors[key].numel() > 1 else torch.zeros(3)
        elif choice == 2:
            tensors[key] = tensors[key].to(torch.int64)
        elif choice == 3:
            tensors[rng.choice(("optimizer.99.momentum_buffer", "optimizer.x.y", "optimizer.0", "rng.cuda"))] = \
                torch.zeros(3)
        else:
            tensors[key] = torch.zeros(0, dtype=tensors[key].dtype)
        return f"resume:tensors{choice}", st_save(tensors, metadata={"training": json.dumps(self.record)})

    def edit_record(self, rng: random.Random) -> tuple[str, bytes]:
        kind, record = mutate_tree(self.record, rng)
        return f"resume:{kind}", st_save(st_load(self.seed), metadata={"training": _json_dumps(record)})

    def load(self, path: Path) -> Any:
        """What a resumed stage does with the file: the checkpoint reader, then the resume validation."""
        metadata = io.read_metadata(path)  # the same validated header as io.load
        if metadata is None or "training" not in metadata:
            raise MicronetError(f"{path} is not a stage checkpoint with resume state")
        tensors = _read_tensors(path)
        record = parse_json(f"{path} training", metadata["training"])
        check_training_state(record, str(path))
        with torch.random.fork_rng(devices=[]):
            restore_state(self._optimizer(), tensors, record["optimizer"], torch.device("cpu"), str(path))
        return record

    def correct(self, result: Any, data: bytes, kind: str) -> bool:
        return isinstance(result, dict)


TARGETS: dict[str, type[Target]] = {t.name: t for t in (
    MicronetTarget, StateDictTarget, RiairTarget, CifarTarget, NpzTarget, NpyTarget, ImageTarget, RecipeTarget,
    AugPolicyTarget, ScorePolicyTarget, ResumeTarget)}


# ----------------------------------------------------------------------------------------------- running
class Hang(BaseException):
    """Raised by the alarm when one mutant runs past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block with ``Hang`` after ``seconds`` (main thread, POSIX)."""
    def alarm(signum: int, frame: Any) -> None:
        raise Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_mutant(target: Target, kind: str, data: bytes, timeout: float = 5.0) -> tuple[str, str]:
    """Load one mutant; returns (outcome, detail)."""
    path = target.place(data)
    start = time.monotonic()
    try:
        with time_limit(timeout):
            result = target.load(path)
            ok = target.correct(result, data, kind)
    except Hang:
        return "hang", f"{kind}: over {timeout:g} s"
    except MicronetError as exc:
        message = str(exc)
        if "\n" in message or not message.strip():
            return "traceback", f"{kind}: multi-line or empty error {message[:200]!r}"
        if path.name not in message:
            return "traceback", f"{kind}: error does not name the file: {message[:200]}"
        return "clean", message[:200]
    except Exception as exc:  # noqa: BLE001 - the point of the harness: anything else is a finding
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        return "traceback", f"{kind}: {type(exc).__name__}: {str(exc)[:120]} at {frame.filename}:{frame.lineno}"
    if time.monotonic() - start > timeout:
        return "hang", f"{kind}: {time.monotonic() - start:.1f} s"
    return ("success" if ok else "wrong"), kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=int, default=3000, help="Mutants in all, shared among the targets.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", default=",".join(TARGETS), help="Comma-separated subset of: " + ", ".join(TARGETS))
    parser.add_argument("--timeout", type=float, default=5.0, help="Seconds one mutant may take before it is a hang.")
    parser.add_argument("--workdir", default=None, help="Scratch folder (default: a temp folder).")
    parser.add_argument("--json", action="store_true", help="Print the counts as JSON.")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # torch's notes on pickle protocols and sparse tensors, once per mutant

    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}")
    counts: dict[str, Counter] = {}
    findings: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for index, name in enumerate(names):
            target = TARGETS[name]()
            target.setup(Path(tmp) / name)
            rng = random.Random(f"{args.seed}:{name}")
            share = args.mutants // len(names) + (index < args.mutants % len(names))
            counts[name] = Counter({o: 0 for o in OUTCOMES})
            for _ in range(share):
                kind, data = target.mutate(rng)
                outcome, detail = run_mutant(target, kind, data, args.timeout)
                counts[name][outcome] += 1
                if outcome in ("traceback", "wrong", "hang"):
                    findings.append(f"{name} {outcome}: {detail}")
    total = sum(counts.values(), Counter())
    if args.json:
        print(json.dumps({"targets": {k: dict(v) for k, v in counts.items()}, "total": dict(total),
                          "tried": sum(total.values()), "seconds": round(time.monotonic() - started, 1),
                          "findings": findings[:50]}, indent=2))
    else:
        print(f"{'target':<14}{'tried':>7}" + "".join(f"{o:>11}" for o in OUTCOMES))
        for name, c in [*counts.items(), ("TOTAL", total)]:
            print(f"{name:<14}{sum(c.values()):>7}" + "".join(f"{c[o]:>11}" for o in OUTCOMES))
        print(f"{time.monotonic() - started:.0f} s")
        for line in findings[:50]:
            print("  " + line)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
