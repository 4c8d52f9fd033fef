"""Stage provenance: `train-stage all` reuses a stage only when nothing that produced it changed, refuses
before any work otherwise, recomputes exactly the suffix asked for, and never overwrites a finished
checkpoint unless told."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from micronet import io as mio
from micronet.cli import main
from micronet.errors import MicronetError
from micronet.training import RunOptions, load_recipe, run_all, run_stage
from tests.training.conftest import write_cifar10

SHORT = {
    "name": "short",
    "model": "densenet_bc:depth=10,growth=4",
    "seed": 0,
    "data": {"normalization": "cifar10", "holdout": 0.1},
    "augment": {"policy": None, "crop_padding": 2, "flip": True, "cutout": 0},
    "train": {"batch_size": 64, "loss": "ce"},
    "stages": {
        "student": {"epochs": 1, "lr": 0.1},
        "prune": {"epochs": 1, "lr": 0.02, "sparsity": 0.75},
        "bn-recal": {"batches": 2},
    },
}
CHAIN = ["student", "prune", "bn-recal"]


def _recipe(tmp: Path, tree: dict = SHORT, sets: tuple[str, ...] = (), **overrides):
    path = tmp / f"r{abs(hash((json.dumps(tree, sort_keys=True), sets)))}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_recipe(path, overrides, sets)


def _hashes(out: Path) -> dict[str, str]:
    return {s: mio.read_metadata(out / f"{s}.safetensors")["content_sha256"] for s in CHAIN}


@pytest.fixture(scope="module")
def finished(cifar10_root, tmp_path_factory):
    """A finished three-stage run (student, prune, bn-recal) and its file hashes."""
    base = tmp_path_factory.mktemp("provenance")
    run_all(_recipe(base), RunOptions(data_root=cifar10_root, out=base / "run", progress=False))
    return base / "run", _hashes(base / "run")


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    return out


def _all(recipe, root: Path, out: Path, **kw):
    return run_all(recipe, RunOptions(data_root=root, out=out, progress=False, **kw))


def test_an_identical_rerun_reuses_every_stage(finished, cifar10_root, tmp_path):
    out, hashes = finished
    results = _all(_recipe(tmp_path), cifar10_root, out)
    assert [r.stage for r in results] == CHAIN and all(r.skipped for r in results)
    assert _hashes(out) == hashes
    # Only what produced the stage counts: the recipe's name and file are not part of it.
    assert all(r.skipped for r in _all(_recipe(tmp_path, {**SHORT, "name": "renamed"}), cifar10_root, out))


@pytest.mark.parametrize(("sets", "overrides", "stage", "named"), [
    (("stages.prune.sparsity=0.5",), {}, "prune", "stages.prune.sparsity 0.75 -> 0.5"),
    (("stages.bn-recal.batches=3",), {}, "bn-recal", "stages.bn-recal.batches 2 -> 3"),
    (("stages.student.lr=0.05",), {}, "student", "stages.student.lr 0.1 -> 0.05"),
    (("augment.cutout=4",), {}, "student", "augment.cutout 0 -> 4"),
    (("data.holdout=0.2",), {}, "student", "data.holdout 0.1 -> 0.2"),
    ((), {"seed": 1}, "student", "seed 0 -> 1"),
    ((), {"model": "densenet_bc:depth=16,growth=4"}, "student", "model"),
    ((), {"epochs": 2}, "student", "stages.student.epochs 1 -> 2"),
])
def test_any_changed_field_stops_the_run_before_any_work(finished, cifar10_root, tmp_path, sets, overrides, stage,
                                                         named):
    out, hashes = finished
    with pytest.raises(MicronetError) as err:
        _all(_recipe(tmp_path, sets=sets, **overrides), cifar10_root, out)
    message = str(err.value)
    assert f"{stage}.safetensors was made with different inputs" in message and named in message, message
    assert f"--rerun-from {stage}" in message and "\n" not in message
    assert _hashes(out) == hashes  # nothing was touched


def test_changed_data_stops_the_run(finished, tmp_path):
    out, hashes = finished
    other = write_cifar10(tmp_path / "other", train_per_class=60)  # same layout, other images
    with pytest.raises(MicronetError, match=r"student\.safetensors .*training images or split changed"):
        _all(_recipe(tmp_path), other, out)
    assert _hashes(out) == hashes


def test_a_replaced_input_checkpoint_stops_the_later_stages(run_copy, cifar10_root, tmp_path):
    ck = mio.load(run_copy / "student.safetensors")
    with torch.no_grad():
        ck.model.fc.bias.add_(0.01)
    mio.save(run_copy / "student.safetensors", ck.model, history=ck.history, metrics=ck.metrics, extra=ck.extra)
    before = _hashes(run_copy)
    with pytest.raises(MicronetError, match=r"prune\.safetensors .*its input checkpoint \(student\) changed"):
        _all(_recipe(tmp_path), cifar10_root, run_copy)
    assert _hashes(run_copy) == before


def test_rerun_from_recomputes_exactly_the_suffix(run_copy, finished, cifar10_root, tmp_path):
    recipe = _recipe(tmp_path, sets=("stages.prune.sparsity=0.5",))
    results = _all(recipe, cifar10_root, run_copy, rerun_from="prune")
    assert [(r.stage, r.skipped) for r in results] == [("student", True), ("prune", False), ("bn-recal", False)]
    after, before = _hashes(run_copy), finished[1]
    assert after["student"] == before["student"]
    assert after["prune"] != before["prune"] and after["bn-recal"] != before["bn-recal"]
    assert mio.read_header(run_copy / "prune.safetensors")["history"][-1]["settings"]["sparsity"] == 0.5
    assert not list(run_copy.glob("*.prev.*"))  # the old ones are dropped once the new ones are complete
    assert all(r.skipped for r in _all(recipe, cifar10_root, run_copy))  # and now it is consistent again


def test_a_missing_middle_stage_with_later_ones_present_is_refused(run_copy, cifar10_root, tmp_path):
    (run_copy / "prune.safetensors").unlink()
    with pytest.raises(MicronetError, match=r"bn-recal\.safetensors exists but an earlier stage \(prune\)"):
        _all(_recipe(tmp_path), cifar10_root, run_copy)
    assert not (run_copy / "prune.safetensors").exists()


def test_a_single_stage_never_overwrites_a_finished_checkpoint_unless_told(run_copy, cifar10_root, tmp_path):
    recipe = _recipe(tmp_path)
    path = run_copy / "student.safetensors"
    before = mio.read_metadata(path)["content_sha256"]
    options = RunOptions(data_root=cifar10_root, out=run_copy, progress=False)
    with pytest.raises(MicronetError, match="is a finished 'student' checkpoint: pass --overwrite"):
        run_stage("student", recipe, options)
    assert mio.read_metadata(path)["content_sha256"] == before

    seen = []

    def look(step: int, model) -> None:  # while the new one trains, the old one waits as student.prev
        prev = run_copy / "student.prev.safetensors"
        seen.append(prev.exists() and mio.read_metadata(prev)["content_sha256"] == before)

    changed = _recipe(tmp_path, sets=("stages.student.lr=0.05",))
    run_stage("student", changed, dataclasses.replace(options, overwrite=True, after_step=look))
    assert seen and all(seen)
    assert not (run_copy / "student.prev.safetensors").exists() and not (run_copy / "student.prev.jsonl").exists()
    assert mio.read_header(path)["history"][-1]["settings"]["lr"] == 0.05
    # --resume on a finished checkpoint reuses it only when it was made the same way
    assert run_stage("student", changed, dataclasses.replace(options, resume=True)).skipped
    with pytest.raises(MicronetError, match="stages.student.lr 0.05 -> 0.1"):
        run_stage("student", recipe, dataclasses.replace(options, resume=True))


def test_cli_refuses_in_one_line_and_runs_show_prints_the_chain(finished, cifar10_root, tmp_path):
    out, _ = finished
    recipe = tmp_path / "short.yaml"
    recipe.write_text(yaml.safe_dump(SHORT))
    r = CliRunner().invoke(main, ["train-stage", "all", "--recipe", str(recipe), "--data-root", str(cifar10_root),
                                  "--out", str(out), "--set", "stages.prune.sparsity=0.5", "--no-progress"])
    assert r.exit_code == 2 and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert "--rerun-from prune" in r.output

    r = CliRunner().invoke(main, ["runs", "show", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [row["stage"] for row in rows] == CHAIN and all(row["status"] == "complete" for row in rows)
    # the chain is linked: each stage's recorded input is the previous file's content hash
    assert rows[1]["from"] == rows[0]["content_sha256"] and rows[2]["from"] == rows[1]["content_sha256"]
    assert all(len(row["fingerprint"]) == 64 and row["seconds"] > 0 for row in rows)

    table = CliRunner().invoke(main, ["runs", "show", str(out)])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split()[:3] == ["stage", "status", "fingerprint"]
    assert [line.split()[0] for line in lines[2:5]] == CHAIN
    assert rows[0]["fingerprint"][:12] in lines[2]
