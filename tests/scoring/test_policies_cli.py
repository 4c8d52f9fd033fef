"""Policies (presets, overrides, YAML), the freebie rule, and the `micronet score` command."""

import csv
import json
from fractions import Fraction

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from micronet import models
from micronet.cli import main
from micronet.errors import MicronetError
from micronet.io import load_model
from micronet.io.riair2019 import random_riair2019_state
from micronet.models.summary import build_for_sizing
from micronet.scoring import PRESETS, resolve_policy, score
from tests.scoring.nets import ModuleTwin


def test_presets_and_overrides():
    assert {"official", "freebie16", *(f"riair2019-t{i}" for i in range(7))} <= set(PRESETS)
    p = resolve_policy("official", {"accumulator": "adder_tree", "float_bits": "16", "freebie": "false"})
    assert (p.accumulator, p.float_bits, p.freebie) == ("adder_tree", 16, False)
    with pytest.raises(MicronetError, match="unknown policy field 'colour'"):
        resolve_policy("official", {"colour": "red"})
    with pytest.raises(MicronetError, match="accumulator"):
        resolve_policy("official", {"accumulator": "abacus"})
    with pytest.raises(MicronetError, match="unknown policy"):
        resolve_policy("nonsense")


def test_yaml_policy_file(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("base: riair2019-t4\naccumulator: int_tree_final\nmask: cheapest\n")
    p = resolve_policy(str(f))
    assert (p.name, p.accumulator, p.mask, p.float_bits) == ("mine", "int_tree_final", "cheapest", 16)
    # described by its base and exactly the fields that differ from it (mask: riair2019-t4 has "always")
    assert p.description == "riair2019-t4 with accumulator=int_tree_final, mask=cheapest"
    same = tmp_path / "same.yaml"
    same.write_text("base: official\naccumulator: fp32\n")  # no field differs: the base's description holds
    assert resolve_policy(str(same)).description == PRESETS["official"].description
    res = CliRunner().invoke(main, ["score", "--model", "densenet_bc:depth=10,growth=4", "--policy", str(f),
                                    "--set", "float_bits=32"])
    assert res.exit_code == 0, res.output
    assert "rules page" not in res.output and "2019 CIFAR-100 winner" not in res.output
    assert "riair2019-t4 with accumulator=int_tree_final, mask=cheapest; then float_bits=32" in res.output
    assert resolve_policy("official", {"float_bits": 16}).description == "official with float_bits=16"


def test_freebie_halves_params_and_mults_not_adds():
    model = ModuleTwin().eval()
    full, free = score(model, input_size=8), score(model, "freebie16", input_size=8)
    assert free.params == full.params / 2
    assert free.mults == full.mults / 2
    assert free.adds == full.adds


def test_freebie_refused_for_quantized_model():
    from micronet.io.riair2019 import build_riair2019

    with pytest.raises(MicronetError, match="freebie"):
        score(build_riair2019(random_riair2019_state()), "freebie16")


def test_imagenet_track():
    model = ModuleTwin().eval()
    r = score(model, track="imagenet", input_size=8)
    assert r.score == pytest.approx(float(r.params) / 6.9e6 + float(r.ops) / 1.17e9)


def test_cli_json_csv_plot(tmp_path):
    sd = tmp_path / "dn.pt"
    from micronet.models import create

    torch.save(create("densenet_bc:depth=10,growth=4").state_dict(), sd)
    out_csv, out_png = tmp_path / "rows.csv", tmp_path / "rows.png"
    res = CliRunner().invoke(
        main,
        [
            "score",
            str(sd),
            "--model",
            "densenet_bc:depth=10,growth=4",
            "--json",
            "--csv",
            str(out_csv),
            "--plot",
            str(out_png),
            "--set",
            "mask=always",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    for key in (
        "score",
        "param_score",
        "op_score",
        "params",
        "ops",
        "mults",
        "adds",
        "policy",
        "track",
        "baseline",
        "layers",
        "by_kind",
        "unknown_ops",
        "accumulator",
        "mask",
    ):
        assert key in data
    assert data["mask"] == "always" and data["baseline"] == {
        "params": 36_500_000,
        "ops": 10_490_000_000,
        "model": "WideResNet-28-10",
    }
    assert data["score"] == pytest.approx(data["params"] / 36.5e6 + data["ops"] / 10.49e9)
    # The rows against independent oracles (totals are sums of rows, so summing them would prove nothing):
    # conv + FC multiplies = torch's FlopCounterMode MACs; conv + FC weight values = the parameter numels.
    net = create("densenet_bc:depth=10,growth=4").eval()
    net.load_state_dict(torch.load(sd))
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(1, 3, 32, 32))
    gemm = [r for r in data["layers"] if r["kind"] in ("conv", "linear")]
    assert sum(r["mults_raw"] for r in gemm) == counter.get_total_flops() // 2
    weights = sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear))
    assert sum(r["params"] for r in gemm) == pytest.approx((weights * 33 + net.fc.out_features * 32) / 32)
    rows = list(csv.DictReader(out_csv.open()))
    assert [(r["name"], r["kind"]) for r in rows] == [(r["name"], r["kind"]) for r in data["layers"]]
    assert [float(r["ops"]) for r in rows] == pytest.approx([r["ops"] for r in data["layers"]])
    assert out_png.stat().st_size > 1000


def test_cli_riair_file_table(tmp_path):
    f = tmp_path / "w.pth.tar"
    torch.save(random_riair2019_state(), f)
    res = CliRunner().invoke(main, ["score", str(f), "--policy", "riair2019-t4"])
    assert res.exit_code == 0, res.output
    assert "riair2019-t4" in res.output and "score" in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/file.pt"], "file not found"),
        (["{corrupt}"], "cannot read"),
        (["{sd}"], "name its architecture with --model"),
        (["{sd}", "--model", "densenet_bc:depth=16,growth=4"], "missing keys"),
        (["{sd}", "--model", "densenet_bc:depth=10,growth=4", "--set", "nope=1"], "unknown policy field"),
        (["{sd}", "--format", "riair2019"], "not a riair2019 checkpoint"),
        (["--model", "no_such_net"], "unknown model"),
        (
            [
                "--model",
                "densenet_bc:depth=10,growth=4",
                "--recipe",
                "micronet2019-densenet",
                "--policy",
                "freebie16",
            ],
            "freebie",
        ),
    ],
)
def test_cli_bad_inputs_are_one_line(tmp_path, args, message):
    from micronet.models import create

    sd, corrupt = tmp_path / "sd.pt", tmp_path / "corrupt.pt"
    torch.save(create("densenet_bc:depth=10,growth=4").state_dict(), sd)
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    args = [a.format(sd=sd, corrupt=corrupt) for a in args]
    res = CliRunner().invoke(main, ["score", *args])
    assert res.exit_code != 0
    assert message in res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_default_target_is_a_labelled_projection():
    res = CliRunner().invoke(
        main,
        ["score", "--model", "densenet_bc:depth=10,growth=4", "--recipe", "micronet2019-densenet", "--json"],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert any(n.startswith("PROJECTION") for n in data["notes"]) and data["quantized"]


def test_block_mask_bits():
    from micronet.compress.integer_modules import IntLinear

    codes = torch.zeros(8, 8)
    codes[:4, :4] = 1.0  # one live 4x4 block of four
    net = nn.Sequential(IntLinear(codes, weight_bits=4, block=(4, 4)))
    report = score(net, input_size=8, data=torch.randn(1, 8))
    assert report.params == Fraction(16 * 4 + 4, 32)


def test_plain_state_dict_with_ten_classes_loads(tmp_path):
    import torch

    from micronet.io import load_model
    from micronet.models import create

    net = create("densenet_bc:depth=10,growth=4", num_classes=10)
    torch.save(net.state_dict(), tmp_path / "ten.pth")
    loaded = load_model(tmp_path / "ten.pth", model="densenet_bc:depth=10,growth=4")
    assert loaded.fc.out_features == 10
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


def test_ten_class_state_dict_of_the_published_skipnet_loads_and_scores(tmp_path):
    # Regression: the last Linear of pyramidskipnet272_a200 is its gate controller's projection, which the
    # old loader took for the classifier, so this file failed with "fc.weight (10, 96) vs (100, 96)".
    # Shapes only: built on the meta device without running its initialisation (seconds for 26M weights).
    shapes = build_for_sizing(lambda: models.create("pyramidskipnet272_a200", num_classes=10)).state_dict()
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}, tmp_path / "ten.pth")
    loaded = load_model(tmp_path / "ten.pth", model="pyramidskipnet272_a200")
    assert loaded.fc.out_features == 10 and loaded.controller.proj.out_features == 1
    report = score(loaded, samples=1)
    assert report.params > 0 and report.gate_rates


def test_whole_counts_print_as_integers_in_the_table():
    res = CliRunner().invoke(main, ["score", "--model", "densenet_bc:depth=10,growth=4"])
    assert res.exit_code == 0, res.output
    stem = next(line.split() for line in res.output.splitlines() if line.startswith("conv_stem "))
    # hand count: 8x3x3x3 float weights, no bias; one multiply per weight per 32x32 output position
    assert stem[-4:-2] == [f"{8 * 3 * 3 * 3:,}", f"{8 * 3 * 3 * 3 * 32 * 32:,}"]
    assert not any(token.endswith(".0") or token.endswith(".00") for token in res.output.split())
    params = next(line for line in res.output.splitlines() if line.startswith("params "))
    assert params.split()[1] == f"{int(score(models.create('densenet_bc:depth=10,growth=4')).params):,}"
