"""Models researchers bring: torchvision:/timm: names, module:callable and file.py:callable factories, weights
files (state_dicts; whole pickled modules only with --trust-pickle), through the `score` command."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from micronet.cli import main
from micronet.errors import MicronetError
from micronet.io import build_external, create_model, load_model

FACTORY = """
import torch.nn as nn

def build(width=4, classes=10):
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, classes))

def broken():
    raise ValueError("no such width")
"""


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _score(*args):
    return CliRunner().invoke(main, ["score", *args])


def test_cli_scores_a_torchvision_model_at_the_tracks_size():
    res = _score("--model", "torchvision:resnet18", "--track", "imagenet", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["input_size"] == [224, 224] and data["complete"] is True
    # resnet18: 1,814,073,344 conv + FC MACs (torch FlopCounterMode), 11.69M parameters
    assert data["by_kind"]["conv"]["mults_raw"] + data["by_kind"]["linear"]["mults_raw"] == 1_814_073_344


def test_cli_scores_a_user_factory_with_model_args(factory):
    res = _score("--model", "my_models.py:build", "--model-arg", "width=6", "--json", "--strict")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["params"] == 6 * 3 * 9 + 6 + 6 * 10 + 10
    assert data["input_shape"] == [1, 3, 32, 32]


def test_module_path_factory_and_input_size_hxw(factory, monkeypatch):
    monkeypatch.syspath_prepend(str(factory))
    res = _score("--model", "my_models:build", "--input-size", "16x24", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["input_shape"] == [1, 3, 16, 24]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "my_models.py:nope"], "has no callable 'nope'"),
        (["--model", "my_models.py:broken"], "building my_models.py:broken failed: ValueError: no such width"),
        (["--model", "no_such_module_xyz:build"], "cannot import module 'no_such_module_xyz'"),
        (["--model", "torchvision:resnet_nope"], "unknown torchvision classification model"),
        (["--model", "my_models.py:build", "--input-size", "axb"], "--input-size expects integers"),
    ],
)
def test_bad_model_specs_are_one_line_errors(factory, args, message):
    res = _score(*args)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_weights_file_that_does_not_fit_names_the_key_and_shapes(factory):
    wrong = build_external("my_models.py:build", {"width": 5}).state_dict()
    torch.save(wrong, factory / "w.pt")
    res = _score("w.pt", "--model", "my_models.py:build")
    assert res.exit_code == 2
    assert "0.weight (5, 3, 3, 3) vs (4, 3, 3, 3)" in res.output


def test_weights_file_loads_into_the_external_model(factory):
    net = build_external("my_models.py:build")
    torch.save(net.state_dict(), factory / "w.pt")
    loaded = load_model(factory / "w.pt", model="my_models.py:build")
    assert torch.equal(loaded[0].weight, net[0].weight)


def test_a_pickled_module_needs_trust_pickle(factory):
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)), factory / "whole.pt")
    res = _score("whole.pt")
    assert res.exit_code == 2 and "--trust-pickle" in res.output
    res = _score("whole.pt", "--trust-pickle", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["params"] == 3 * 32 * 32 * 2 + 2


def test_zoo_specs_still_parse_and_model_args_need_an_external_model():
    assert create_model("densenet_bc:depth=10,growth=4") is not None
    with pytest.raises(MicronetError, match="--model-arg"):
        create_model("densenet100_k12", model_args={"x": 1})


TOKENS = """
import torch.nn as nn

class Bag(nn.Module):
    def __init__(self, vocab, dim):
        super().__init__()
        self.emb, self.fc = nn.Embedding(vocab, dim), nn.Linear(dim, 4)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))

def build(vocab=50):
    return Bag(int(vocab), 8)
"""


def test_cli_scores_token_ids_through_an_embedding(tmp_path, monkeypatch):
    (tmp_path / "tokens.py").write_text(TOKENS)
    monkeypatch.chdir(tmp_path)
    res = _score("--model", "tokens.py:build", "--input-shape", "16", "--input-dtype", "int64", "--json", "--strict")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["input_shape"] == [1, 16] and data["input_dtype"] == "int64" and data["input_bits"] == 32
    # table 50 x 8 and fc 8x4 + 4; the lookup is free; mean over 16 tokens: 15 x 8 adds + 8 mults;
    # fc: 32 mults, 7 x 4 + 4 (bias) adds
    assert data["params"] == 50 * 8 + 8 * 4 + 4
    assert data["by_kind"]["embedding"]["mults_raw"] == 0 and data["by_kind"]["embedding"]["adds_raw"] == 0
    assert data["mults_raw"] == 8 + 32 and data["adds_raw"] == 15 * 8 + 32


def test_float_token_ids_fail_with_a_hint(tmp_path, monkeypatch):
    (tmp_path / "tokens.py").write_text(TOKENS)
    monkeypatch.chdir(tmp_path)
    res = _score("--model", "tokens.py:build", "--input-shape", "16")
    assert res.exit_code == 2
    assert res.output.startswith("error: the model's forward pass failed at input size 1x16 (float32)")
    assert "--input-dtype int64" in res.output and len(res.output.strip().splitlines()) == 1
