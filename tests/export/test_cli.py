"""`micronet export` on every checkpoint kind the scorer accepts, and its one-line errors."""

from __future__ import annotations

import json

import onnx
import torch
from click.testing import CliRunner
from onnx import TensorProto

from micronet import models
from micronet.cli import main
from tests.export.conftest import compressed

QUICK = ["--samples", "24", "--no-timing", "--json"]


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_micronet_checkpoint(tmp_path):
    from micronet.io import save

    torch.manual_seed(0)
    ckpt = save(tmp_path / "m.safetensors", compressed(models.create("densenet_bc:depth=10,growth=4")))
    out = tmp_path / "m.onnx"
    res = _run("export", str(ckpt), "-o", str(out), *QUICK)
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["parity"]["passed"] and report["weights"]["tensors"]["dense INT4"] == 9
    assert report["checkpoint_bytes"] == ckpt.stat().st_size and report["file_bytes"] == out.stat().st_size
    assert report["storage_bytes"] > 0


def test_verification_on_real_images_from_data_root(tmp_path):
    from micronet.io import save
    from tests.training.conftest import write_cifar100

    torch.manual_seed(0)
    ckpt = save(tmp_path / "m.safetensors", compressed(models.create("densenet_bc:depth=10,growth=4")))
    root = write_cifar100(tmp_path / "data", test_per_class=1)
    res = _run("export", str(ckpt), "-o", str(tmp_path / "m.onnx"), "--data-root", str(root), *QUICK)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["parity"]["source"] == "data"


def test_plain_state_dict_with_model(tmp_path):
    spec = "wrn:depth=10,width=1"
    path = tmp_path / "w.pt"
    torch.save(models.create(spec).state_dict(), path)
    out = tmp_path / "w.onnx"
    res = _run("export", str(path), "-o", str(out), "--model", spec, *QUICK)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["parity"]["passed"]
    missing = _run("export", str(path), "-o", str(tmp_path / "x.onnx"), *QUICK)
    assert missing.exit_code == 2 and "--model" in missing.output


def test_synthetic_riair2019_checkpoint(tmp_path):
    from micronet.io.riair2019 import random_riair2019_state

    path = tmp_path / "densenet-100.pth.tar"
    torch.save(random_riair2019_state(seed=0), path)
    out = tmp_path / "riair.onnx"
    res = _run("export", str(path), "-o", str(out), "--sparse-weights", "--samples", "17", "--no-timing", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["parity"]["passed"] and report["parity"]["weights_checked"] == 100
    # 99 4-bit convs at 25% density: Rice-coded gaps (~0.8 bit per position) beat the bitmask's 1 bit; the
    # 50%-dense 6-bit FC: non-zeros in 6-bit fields (63 values, zero left out) beat INT8, and its positions take
    # Rice k=0 (a bitmask would be 7 B smaller but would need its own ~840 B decoder function)
    assert report["weights"]["tensors"] == {"rice INT4": 99, "rice 6-bit (no zero)": 1}
    assert report["file_bytes"] <= 1.15 * report["storage_bytes"]  # issue 11's target (measured 1.136x)
    graph = onnx.load(str(out)).graph
    fc_nz = next(t for t in graph.initializer if t.name == "fc.weight.nz")
    fc = next(row for row in report["weight_encodings"] if row["module"] == "fc")
    assert fc_nz.data_type == TensorProto.UINT8 and len(fc_nz.raw_data) == -(-6 * fc["nnz"] // 8)


def test_errors_are_one_line(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(models.create("densenet_bc:depth=10,growth=4").state_dict(), path)
    missing_dir = _run("export", str(path), "-o", str(tmp_path / "no" / "m.onnx"), "--model",
                       "densenet_bc:depth=10,growth=4")
    assert missing_dir.exit_code == 2
    assert missing_dir.output.strip().count("\n") == 0 and "does not exist" in missing_dir.output
    existing = tmp_path / "m.onnx"
    existing.write_bytes(b"keep me")
    res = _run("export", str(path), "-o", str(existing), "--model", "densenet_bc:depth=10,growth=4")
    assert res.exit_code == 2 and "--force" in res.output and res.output.strip().count("\n") == 0
    assert "force=True" not in res.output  # CLI wording, not the Python keyword
    assert existing.read_bytes() == b"keep me"
    nofile = _run("export", str(tmp_path / "absent.pt"), "-o", str(tmp_path / "a.onnx"))
    assert nofile.exit_code == 2 and "not found" in nofile.output


def test_size_lines_name_what_they_compare_with_and_a_useless_mask_is_flagged(tmp_path):
    from micronet.io import save

    torch.manual_seed(0)
    ckpt = save(tmp_path / "m.safetensors", compressed(models.create("densenet_bc:depth=10,growth=4")))
    out = tmp_path / "m.onnx"
    res = _run("export", str(ckpt), "-o", str(out), "--sparse-weights", "--samples", "8", "--no-timing")
    assert res.exit_code == 0, res.output
    size_lines = [line for line in res.output.splitlines() if " B" in line and not line.startswith(("wrote", "note"))]
    assert any(f"ONNX file {out.stat().st_size:,} B" in line for line in size_lines)
    for line in size_lines[1:]:  # every other size says it is compared with the ONNX file
        assert "the ONNX file is" in line and "x that)" in line, line
    assert "larger)" not in res.output
    # Oracle: the same checkpoint exported without --sparse-weights, measured on disk.
    dense = tmp_path / "d.onnx"
    plain = _run("export", str(ckpt), "-o", str(dense), "--samples", "8", "--no-timing", "--json")
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.output)["dense_file_bytes"] is None
    dense_size, sparse_size = dense.stat().st_size, out.stat().st_size
    assert f"without --sparse-weights {dense_size:,} B" in res.output
    flagged = "--sparse-weights made the file larger" in res.output
    assert flagged == (sparse_size > dense_size)
    if flagged:
        assert "too dense" in res.output and "for a mask to pay" in res.output


def test_export_verification_shows_a_status_bar_only_when_asked(tmp_path, capsys):
    from micronet.export import export_onnx

    torch.manual_seed(0)
    net = compressed(models.create("densenet_bc:depth=10,growth=4"))
    export_onnx(net, tmp_path / "quiet.onnx", samples=70, timing=False)
    assert capsys.readouterr().err == ""  # off by default in the library
    report = export_onnx(net, tmp_path / "shown.onnx", samples=70, timing=False, progress=True)
    err = capsys.readouterr().err
    assert report.parity.passed
    assert "export verification" in err and "export: ONNX checker" in err
    # its length: 1 weight check + 2 x 2 batches of 64 (PyTorch, onnxruntime) + 3 dynamic-batch checks; the steps:
    # graph, checker, verification, writing
    assert "0/8" in err and "0/4" in err


def test_pixel_input_dense_comparison_is_the_size_of_a_real_dense_pixel_export(tmp_path):
    """The dense build the size note compares with carries the same micronet.* metadata as the written file."""
    from micronet.io import save  # noqa: PLC0415 (as the other tests here)

    torch.manual_seed(0)
    ckpt = save(tmp_path / "m.safetensors", compressed(models.create("densenet_bc:depth=10,growth=4")),
                extra={"normalization": "cifar10"})
    common = ["--input", "pixels", "--samples", "8", "--no-timing", "--json"]
    sparse = _run("export", str(ckpt), "-o", str(tmp_path / "s.onnx"), "--sparse-weights", *common)
    dense = _run("export", str(ckpt), "-o", str(tmp_path / "d.onnx"), *common)
    assert sparse.exit_code == 0 and dense.exit_code == 0, sparse.output + dense.output
    # Oracle: the file written without --sparse-weights, measured on disk.
    assert json.loads(sparse.output)["dense_file_bytes"] == (tmp_path / "d.onnx").stat().st_size
    props = {p.key for p in onnx.load(str(tmp_path / "d.onnx")).metadata_props}
    assert {"micronet.input", "micronet.normalization"} <= props
