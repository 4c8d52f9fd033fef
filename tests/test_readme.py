"""The README cannot drift: every fenced command and the Python snippet run here (on tiny models and data), and
the command table names exactly the options click defines."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from micronet import models
from micronet.cli import main
from micronet.io.riair2019 import random_riair2019_state
from tests.training.conftest import write_cifar100

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# How each README command is shrunk to run in seconds: extra arguments appended to it. A README command missing
# here fails the test, so a new or changed example is run, not forgotten.
_TINY_TRAIN = ["--model", "densenet_bc:depth=10,growth=4", "--teacher-model", "densenet_bc:depth=10,growth=4",
               "--epochs", "1", "--batch-size", "50", "--set", "data.holdout=50", "--no-progress"]
TINY_ARGS: dict[str, list[str]] = {
    "micronet score": [],
    "micronet score runs/dense/quant-fc.safetensors": [],
    "micronet score weights.pth --model densenet100_k12": [],
    "micronet score densenet-100.pth.tar --format riair2019 --policy riair2019-t4": [],
    "micronet score --model wrn28_10 --json": [],
    "micronet train-stage all --recipe recipes/micronet2019-densenet.yaml --data-root data/ --out runs/dense":
        _TINY_TRAIN,
    "micronet train-stage prune --recipe recipes/micronet2019-densenet.yaml --data-root data/ --from "
    "runs/dense/student.safetensors --teacher runs/dense/teacher.safetensors --out runs/dense/prune-again":
        _TINY_TRAIN,
    "micronet runs show runs/dense": [],
    "micronet export runs/dense/quant-fc.safetensors -o densenet.onnx": ["--samples", "16", "--no-timing"],
}


def fenced(language: str) -> list[str]:
    """The bodies of the README's fenced blocks in ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def shell_commands() -> list[list[str]]:
    """Every command line of the bash blocks, continuations joined, comments dropped."""
    commands = []
    for block in fenced("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_every_readme_command_has_a_tiny_run_and_make_targets_exist():
    commands = shell_commands()
    micronet = [" ".join(c) for c in commands if c[0] == "micronet"]
    assert micronet and sorted(micronet) == sorted(TINY_ARGS), "README commands and TINY_ARGS differ"
    makefile = (ROOT / "Makefile").read_text()
    for words in commands:
        assert words[0] in ("micronet", "make"), words
        if words[0] == "make":
            assert all(re.search(rf"^{target}:", makefile, flags=re.M) for target in words[1:]), words
    assert re.search(r"^gpu:", makefile, flags=re.M)  # the README's GPU advice


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder laid out as the README assumes: data/, recipes/, weights files."""
    work = tmp_path_factory.mktemp("readme")
    write_cifar100(work / "data")
    (work / "recipes").symlink_to(ROOT / "recipes")
    torch.save(models.create("densenet100_k12").state_dict(), work / "weights.pth")
    torch.save(random_riair2019_state(), work / "densenet-100.pth.tar")
    return work


def test_every_readme_command_runs(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    torch.set_num_threads(1)
    outputs = {}
    # The training examples make the checkpoints the scoring and export examples read: run them first.
    commands = sorted((c for c in shell_commands() if c[0] == "micronet"), key=lambda c: c[1] != "train-stage")
    for words in commands:
        key = " ".join(words)
        r = CliRunner().invoke(main, [*words[1:], *TINY_ARGS[key]])
        assert r.exit_code == 0, f"{key}\n{r.output}"
        outputs[key] = r.output
    baseline = json.loads(outputs["micronet score --model wrn28_10 --json"])
    assert baseline["score"] == pytest.approx(2.0, abs=0.005)  # what the README's comment says
    assert Path("densenet.onnx").stat().st_size > 0
    assert "quant-fc" in outputs["micronet runs show runs/dense"]


def test_the_python_snippet_runs(tmp_path, monkeypatch):
    (snippet,) = fenced("python")
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102 - the README's own example, run as written
    assert (tmp_path / "model.safetensors").stat().st_size > 0


def _table_rows() -> dict[str, str]:
    start = README.index("| command | what it does |")
    rows = {}
    for line in README[start:].splitlines()[2:]:
        if not line.startswith("| `micronet "):
            break
        usage = line.split("`")[1]
        words = usage.split()
        path = [w for w in words[1:3] if re.fullmatch(r"[a-z][a-z-]*", w)]
        rows[" ".join(path if path[:1] != ["runs"] else path[:2])] = usage
    return rows


def test_the_command_table_matches_click():
    rows = _table_rows()
    assert set(rows) >= {"models", "score", "train-stage", "runs show", "eval", "export"}
    for path, usage in rows.items():
        command: click.Command = main
        for part in path.split():
            command = command.commands[part]
        options = {opt for p in command.params if isinstance(p, click.Option) for opt in p.opts}
        named = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", usage))
        assert named <= options, (path, named - options)  # nothing stale
        longest = {max(p.opts, key=len) for p in command.params if isinstance(p, click.Option)}
        required = {max(p.opts, key=len) for p in command.params if isinstance(p, click.Option) and p.required}
        missing = {o for o in longest - named if not any(alias in named for p in command.params
                                                          if o in p.opts for alias in p.opts)}
        if usage.endswith("..."):  # a long option list ends in `...`: its required options must still be there
            assert not (required & missing), (path, required & missing)
        else:
            assert not missing, (path, sorted(missing))
