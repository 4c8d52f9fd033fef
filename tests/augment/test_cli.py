"""`micronet augment search|show` and `train-stage` with a searched policy, end to end on tiny data."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import micronet.cli
from micronet.cli import main
from micronet.training.augment import load_policy
from micronet.training.policy_search import SearchSettings
from tests.training.conftest import write_cifar10

pytest.importorskip("optuna")

TINY_SEARCH = ["--model", "densenet_bc:depth=10,growth=4", "--epochs", "1", "--batch-size", "32", "--splits", "2",
               "--trials", "2", "--rounds", "1", "--policies-per-trial", "2", "--top", "1", "--views", "2",
               "--startup-trials", "1", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("c10"), train_per_class=8, test_per_class=4)


@pytest.fixture(scope="module")
def searched(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "s"
    r = CliRunner().invoke(main, ["augment", "search", "--data-root", str(data_root), "--out", str(out), *TINY_SEARCH])
    assert r.exit_code == 0, r.output
    return out


def test_search_writes_a_policy_with_its_provenance_and_a_log(searched):
    obj = json.loads((searched / "policy.json").read_text())
    assert obj["searched_on"] == "cifar10" and obj["metadata"]["method"] == "fastaa"
    assert obj["metadata"]["budget"]["trials"] == 2 and len(obj["metadata"]["kept_trials"]) == 2  # 2 splits x top 1
    assert 2 <= len(obj["policy"]) <= 4 and all(len(sub) == 2 for sub in obj["policy"])
    assert len((searched / "trials.jsonl").read_text().splitlines()) == 2 * 2
    assert (searched / "split0" / "model.safetensors").is_file() and (searched / "search.db").is_file()


def test_train_stage_runs_with_the_searched_policy(searched, data_root, tmp_path):
    recipe = {"name": "tiny", "model": "densenet_bc:depth=10,growth=4", "dataset": "cifar10",
              "data": {"normalization": "fastaa"},
              "augment": {"policy": str(searched / "policy.json"), "crop_padding": 2, "cutout": 4},
              "train": {"batch_size": 32}, "stages": {"student": {"epochs": 1, "lr": 0.05}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = CliRunner().invoke(main, ["train-stage", "student", "--recipe", str(path), "--data-root", str(data_root),
                                  "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress", "--strict-track"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "student.safetensors").is_file()


def test_show_prints_op_counts_and_plots(searched, tmp_path):
    r = CliRunner().invoke(main, ["augment", "show", "fa_shake26_2x96d_cifar100"])
    assert r.exit_code == 0 and "498 sub-policies" in r.output
    assert any(line.split()[:3] == ["Cutout", "154", "15.5%"] for line in r.output.splitlines())  # 154 of 996 ops
    assert "share of ops" in r.output
    r = CliRunner().invoke(main, ["augment", "show", str(searched / "policy.json"), "--json",
                                  "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["method"] == "fastaa" and sum(op["count"] for op in summary["ops"].values()) == \
        2 * len(load_policy(searched / "policy.json").subpolicies)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def _snapshot(path):
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")) if path.exists() else None


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "autoaugment"], "unknown search method 'autoaugment'"),
    (["--trials", "0"], "--trials must be a positive integer"),
    (["--views", "-1"], "--views must be a positive integer"),
    (["--holdout", "1.5"], "--holdout"),
    (["--splits-subset", "7"], "--splits-subset must name splits in 0..1"),
    (["--trials", "3", "--resume"], "settings differ (trials)"),
    (["--model", "resnet9000"], "unknown model 'resnet9000'"),
    (["--cutout", "-1"], "--cutout must not be negative"),
    (["--crop-padding", "-2"], "--crop-padding must not be negative"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be a positive integer"),
    (["--weight-decay", "-1e-4"], "--weight-decay must not be negative"),
    (["--finetune-lr", "0"], "--finetune-lr must be positive"),
    (["--ppo-lr", "-0.1"], "--ppo-lr must be positive"),
    (["--clip", "0"], "--clip must be positive"),
    (["--entropy-weight", "-1"], "--entropy-weight must not be negative"),
    (["--baseline-decay", "1"], "--baseline-decay must be in [0, 1)"),
])
def test_bad_search_input_is_one_line_and_changes_nothing(searched, data_root, extra, message):
    before = _snapshot(searched)
    args = ["augment", "search", "--data-root", str(data_root), "--out", str(searched), *TINY_SEARCH, *extra]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and r.output.count("\n") == 1 and message in r.output, r.output
    assert _snapshot(searched) == before


def test_missing_dataset_and_bad_policy_files_are_one_line_errors(tmp_path):
    r = CliRunner().invoke(main, ["augment", "search", "--data-root", str(tmp_path / "nope"), "--out",
                                  str(tmp_path / "o"), *TINY_SEARCH])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "does not exist" in r.output
    assert not (tmp_path / "o").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[["Rotate", 1.2, 0.5], ["Invert", 0.5, 0.5]]]))
    r = CliRunner().invoke(main, ["augment", "show", str(bad)])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "probability 1.2 of Rotate" in r.output


@pytest.mark.parametrize("method", ["fastaa", "aws"])
def test_a_split_with_an_empty_part_is_one_line_and_writes_nothing(tmp_path, method):
    # 1 image per class: round(0.4 * 1) = 0 held out, so D_A (fastaa) or the validation split (aws) is empty.
    root = write_cifar10(tmp_path / "c10", train_per_class=1, test_per_class=1)
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["augment", "search", "--data-root", str(root), "--out", str(out), *TINY_SEARCH,
                                  "--method", method, "--holdout", "0.4"])
    part = "D_A" if method == "fastaa" else "validation"
    assert r.exit_code == 2 and r.output.count("\n") == 1 and f"{part} part is empty" in r.output, r.output
    assert not out.exists()


def test_an_empty_kept_part_is_one_line_and_writes_nothing(tmp_path):
    # 1 image per class, holdout 0.6: round(0.6 * 1) = 1 held out, D_M is empty.
    root = write_cifar10(tmp_path / "c10", train_per_class=1, test_per_class=1)
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["augment", "search", "--data-root", str(root), "--out", str(out), *TINY_SEARCH,
                                  "--holdout", "0.6"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "split 0's D_M part is empty" in r.output, r.output
    assert not out.exists()


def test_missing_optuna_is_one_line_and_writes_nothing(data_root, tmp_path):
    # A None entry in sys.modules makes `import optuna` raise ImportError, as if it were not installed.
    args = ["augment", "search", "--data-root", str(data_root), "--out", str(tmp_path / "o"), *TINY_SEARCH]
    code = f"import sys; sys.modules['optuna'] = None\nfrom micronet.cli import main\nmain({args!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    output = r.stdout + r.stderr
    assert r.returncode == 2 and output.count("\n") == 1 and "needs optuna" in output, output
    assert not (tmp_path / "o").exists()


def test_every_search_size_is_a_flag(monkeypatch, tmp_path):
    # Every SearchSettings field has a CLI flag of the same name that reaches the settings unchanged.
    seen = {}
    monkeypatch.setattr(micronet.cli, "search", lambda *a, **kw: seen.setdefault("settings", a[2]) and "p.json")
    values = {"cutout": "8", "crop_padding": "2", "eval_batch_size": "64", "weight_decay": "0.001",
              "finetune_lr": "0.02", "ppo_lr": "0.03", "clip": "0.1", "entropy_weight": "0.0001",
              "baseline_decay": "0.5"}
    args = [a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", v)]
    r = CliRunner().invoke(main, ["augment", "search", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"),
                                  *args])
    assert r.exit_code == 0, r.output
    settings = seen["settings"]
    assert {k: getattr(settings, k) for k in values} == {k: type(getattr(SearchSettings(), k))(v)
                                                         for k, v in values.items()}
    flags = {p.name for p in main.commands["augment"].commands["search"].params}
    assert {f.name for f in dataclasses.fields(SearchSettings)} <= flags
