"""`--input`, `--layout` and `--normalization`: one option set shared by `micronet score` and `micronet export`.

`score --input pixels` scores what `export --input pixels` writes: 8-bit model input into the first layer. The
bad combinations are refused the same way by both commands, with one line, before any model is loaded.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from micronet import models
from micronet.cli import main
from micronet.data import get_normalization
from micronet.errors import MicronetError
from micronet.io import save
from micronet.scoring import score
from tests.export.conftest import TINY_ZOO, compressed

SPEC = TINY_ZOO[0]


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same compressed tiny DenseNet saved with a recorded normalisation and without one."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    net = compressed(models.create(SPEC, num_classes=10))
    recorded = save(root / "rec.safetensors", net, extra={"normalization": "cifar10"})
    return net, recorded, save(root / "norecord.safetensors", net)


def _one_line_error(res, *phrases: str) -> None:
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
    for phrase in phrases:
        assert phrase in res.output, res.output


def test_score_input_pixels_scores_8_bit_model_input(checkpoints):
    net, recorded, _ = checkpoints
    res = _run("score", str(recorded), "--input", "pixels", "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["input_bits"] == 8
    stem = next(r for r in got["layers"] if r["kind"] == "conv")
    assert stem["input_bits"] == 8
    # the recorded normalisation (cifar10, not the cifar100 default) is the one folded in
    assert any("normalisation cifar10 folded" in n for n in got["notes"]), got["notes"]
    # a thin shell: the same figures as the library call with that normalisation
    lib = json.loads(score(net, input="pixels", normalization=get_normalization("cifar10")).to_json())
    assert (got["params"], got["ops"], got["score"]) == (lib["params"], lib["ops"], lib["score"])
    floats = json.loads(_run("score", str(recorded), "--json").output)
    assert floats["input_bits"] == 32
    # float input: the first layer multiplies 32-bit inputs
    assert next(r for r in floats["layers"] if r["kind"] == "conv")["input_bits"] == 32


def test_score_pixels_layout_and_named_normalization(checkpoints):
    _, _, plain = checkpoints
    nchw = _run("score", str(plain), "--input", "pixels", "--normalization", "cifar100", "--json")
    nhwc = _run("score", str(plain), "--input", "pixels", "--normalization", "cifar100",
                "--layout", "nhwc", "--json")
    assert nchw.exit_code == 0 and nhwc.exit_code == 0, nchw.output + nhwc.output
    a, b = json.loads(nchw.output), json.loads(nhwc.output)
    assert any("uint8 NHWC images" in n for n in b["notes"]) and any("uint8 NCHW images" in n for n in a["notes"])
    assert (a["params"], a["ops"], a["input_bits"]) == (b["params"], b["ops"], 8)


@pytest.mark.parametrize("command", ["score", "export"])
def test_bad_model_input_options_are_one_line_errors_in_both_commands(command, checkpoints, tmp_path):
    _, recorded, plain = checkpoints
    out = ["-o", str(tmp_path / "m.onnx"), "--no-timing"] if command == "export" else []
    _one_line_error(_run(command, str(recorded), *out, "--input", "pixels", "--normalization", "imagenet-ish"),
                    "unknown normalization 'imagenet-ish'", "cifar100")
    _one_line_error(_run(command, str(recorded), *out, "--layout", "nhwc"), "--layout nhwc needs --input pixels")
    _one_line_error(_run(command, str(recorded), *out, "--normalization", "cifar100"),
                    "--normalization needs --input pixels")
    _one_line_error(_run(command, str(plain), *out, "--input", "pixels"),
                    "norecord.safetensors does not record it", "pass --normalization NAME")
    _one_line_error(_run(command, str(recorded), *out, "--input", "pixel"), "'pixel' is not one of")
    assert not (tmp_path / "m.onnx").exists()


def test_score_pixels_without_a_checkpoint_needs_a_normalization():
    _one_line_error(_run("score", "--model", SPEC, "--input", "pixels"), "a zoo model (no checkpoint)",
                    "--normalization")
    _one_line_error(_run("score", "--model", SPEC, "--input", "pixels", "--normalization", "cifar100",
                         "--input-size", "64"), "--input-size")
    _one_line_error(_run("score", "--model", SPEC, "--input", "pixels", "--normalization", "cifar100",
                         "--input-dtype", "int64"), "--input-dtype")


def test_export_and_score_share_one_option_definition():
    params = {c: {p.name: p for p in main.commands[c].params} for c in ("score", "export")}
    for name in ("model_input", "layout", "normalization"):
        s, e = params["score"][name], params["export"][name]
        assert (s.opts, s.help, s.default, getattr(s.type, "choices", None)) == (
            e.opts, e.help, e.default, getattr(e.type, "choices", None))


@pytest.fixture(scope="module")
def skipnet_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = compressed(models.create("pyramidskipnet:depth=20,alpha=8", num_classes=10))
    return save(tmp_path_factory.mktemp("skip") / "skip.safetensors", net)


@pytest.mark.parametrize("command", ["score", "export"])
def test_a_gated_network_without_an_input_module_has_no_pixel_form_and_says_why(command, skipnet_checkpoint, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setattr(models.PyramidSkipNet, "input_module", None)  # a gated net that does not say where input enters
    out = ["-o", str(tmp_path / "m.onnx"), "--no-timing"] if command == "export" else []
    _one_line_error(_run(command, str(skipnet_checkpoint), *out, "--input", "pixels", "--normalization", "cifar100"),
                    "pixel input is not available for gated networks (PyramidSkipNet)", "declare input_module",
                    "use --input float")
    assert not (tmp_path / "m.onnx").exists()


def test_a_gated_network_scores_and_exports_with_pixel_input(skipnet_checkpoint, tmp_path):
    """PyramidSkipNet declares its input module (the stem conv): 8-bit input into the stem alone, and an export
    that takes uint8 images and keeps one If per gate."""
    res = _run("score", str(skipnet_checkpoint), "--input", "pixels", "--normalization", "cifar100", "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    convs = [r for r in got["layers"] if r["kind"] == "conv"]
    assert got["input_bits"] == 8 and convs[0]["name"].startswith("conv_stem") and convs[0]["input_bits"] == 8
    assert all(r["input_bits"] != 8 or r["name"].startswith("conv_stem") for r in convs)  # the gated blocks as today
    floats = json.loads(_run("score", str(skipnet_checkpoint), "--json").output)
    # the same network plus the normalisation's per-channel scale and shift (3 + 3), as for a traced model
    assert floats["input_bits"] == 32 and got["params"] - floats["params"] == 6
    out = tmp_path / "m.onnx"
    res = _run("export", str(skipnet_checkpoint), "-o", str(out), "--input", "pixels", "--normalization", "cifar100",
               "--samples", "64", "--no-timing")
    assert res.exit_code == 0, res.output
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert sum(n.op_type == "If" for n in proto.graph.node) == 3


def test_a_gated_network_scores_from_nhwc_pixels_with_uint8_examples(skipnet_checkpoint):
    """Synthetic examples for the pixel form are uint8 images in its layout (also those the gate statistics draw);
    NHWC scores as NCHW does, and float data is refused."""
    res = _run("score", str(skipnet_checkpoint), "--input", "pixels", "--normalization", "cifar100",
               "--layout", "nhwc", "--json")
    assert res.exit_code == 0, res.output
    nhwc = json.loads(res.output)
    nchw = json.loads(_run("score", str(skipnet_checkpoint), "--input", "pixels", "--normalization", "cifar100",
                           "--json").output)
    assert nhwc["input_dtype"] == "uint8" and (nhwc["params"], nhwc["ops"]) == (nchw["params"], nchw["ops"])
    model = compressed(models.create("pyramidskipnet:depth=20,alpha=8", num_classes=10))
    with pytest.raises(MicronetError, match="takes uint8 images"):
        score(model, input="pixels", normalization="cifar100", data=torch.randn(2, 3, 32, 32))


def test_score_pixels_reads_raw_test_images_from_data_root(checkpoints, tmp_path):
    from tests.training.conftest import write_cifar100

    _, recorded, _ = checkpoints
    root = write_cifar100(tmp_path / "data", test_per_class=1)
    res = _run("score", str(recorded), "--input", "pixels", "--layout", "nhwc", "--data-root", str(root),
               "--samples", "2", "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["input_bits"] == 8 and got["samples"] == 2


def test_score_pixels_refuses_the_imagenet_track():
    """The pixel form folds a CIFAR preset into a 32x32 first layer: scoring it at 224x224 would not be that form."""
    _one_line_error(_run("score", "--model", SPEC, "--input", "pixels", "--normalization", "cifar100",
                         "--track", "imagenet"), "--track imagenet", "32x32")


@pytest.mark.parametrize("command", ["score", "export"])
def test_a_trusted_pickled_module_without_normalization_is_asked_for_one(command, tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save(models.create(SPEC, num_classes=10).eval(), whole)  # the refusal comes before the model loads
    # export takes no pickled modules at all; either way the missing normalisation is what is asked for first
    out = ["-o", str(tmp_path / "m.onnx"), "--no-timing"] if command == "export" else ["--trust-pickle"]
    _one_line_error(_run(command, str(whole), *out, "--input", "pixels"),
                    "whole.pt does not record it", "pass --normalization NAME")
    assert not (tmp_path / "m.onnx").exists()
