"""export_onnx: faithful, small, verified ONNX files (issue 6 "Must show")."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from onnx import numpy_helper as onh
from torch import nn

from micronet import models
from micronet.compress import deploy_form
from micronet.compress.integer_modules import IntConv2d, IntLinear
from micronet.errors import MicronetError
from micronet.export import export_onnx, verify_onnx
from micronet.export.encoding import read_codes
from tests.export.conftest import TINY_ZOO, IntDenseNet, as_float_net, compressed

FAST = {"timing": False}


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _initializers(path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def test_integer_domain_graph_is_bit_identical(exact_densenet, tmp_path):
    rep = export_onnx(exact_densenet, tmp_path / "m.onnx", samples=128, **FAST)
    assert rep.exact and rep.parity.mode == "exact" and rep.parity.passed
    assert rep.parity.identical == 128 and rep.parity.max_abs == 0.0


def test_float_stem_and_fc_use_the_statistical_rule(int_densenet, tmp_path):
    rep = export_onnx(int_densenet, tmp_path / "m.onnx", samples=512, **FAST)
    assert not rep.exact and rep.parity.mode == "statistical" and rep.parity.passed
    assert rep.parity.within_tol == 512 and rep.parity.top1_agree == 512
    assert rep.parity.max_abs < 1e-4


@pytest.mark.parametrize("spec", TINY_ZOO)
@pytest.mark.parametrize("compress", [False, True], ids=["float", "compressed"])
def test_zoo_models_export_and_verify(spec, compress, tmp_path):
    torch.manual_seed(0)
    model = models.create(spec, num_classes=10).eval()
    if compress:
        model = compressed(model)
    rep = export_onnx(model, tmp_path / "m.onnx", samples=64, **FAST)
    assert rep.parity.passed, rep.parity.format()
    assert rep.parity.weights_checked == len(rep.weights) > 0
    storages = {w.storage for w in rep.weights}
    if compress:
        assert "INT4" in storages and all(w.kind == "codes" for w in rep.weights)
    else:
        assert storages == {"FLOAT"}
    assert (tmp_path / "m.onnx").stat().st_size == rep.file_bytes


def test_dynamic_batch_rows_agree(exact_densenet, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(exact_densenet, path, samples=64, **FAST)
    graph = onnx.load(str(path)).graph
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, 32, 32]
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", 10]
    sess = _session(path)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(3)).numpy()
    full = sess.run(None, {"input": x})[0]
    for b in (1, 3, 17):
        np.testing.assert_array_equal(sess.run(None, {"input": x[:b]})[0], full[:b])


def test_packed_int4_initializers_decode_to_the_model_codes(int_densenet, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(int_densenet, path, samples=32, **FAST)
    inits = _initializers(path)
    deploy = deploy_form(int_densenet)
    layers = {n: m for n, m in deploy.named_modules() if isinstance(m, IntConv2d | IntLinear)}
    assert len(layers) == 6
    for name, m in layers.items():
        t = inits[f"{name}.weight.codes"]
        codes = m.weight.numpy()
        if isinstance(m, IntConv2d):  # 4-bit codes: packed two per byte
            assert t.data_type == TensorProto.INT4
            assert len(t.raw_data) == math.ceil(codes.size / 2)
        else:  # the 6-bit FC does not fit INT4
            assert t.data_type == TensorProto.INT8 and len(t.raw_data) == codes.size
        np.testing.assert_array_equal(onh.to_array(t).astype(np.float32), codes)
    # nothing else in the file is stored as float weights
    assert not [n for n in inits if n.endswith(".weight")]


def test_bitmask_encoding_decodes_exactly_with_one_shared_function(int_densenet, tmp_path):
    path = tmp_path / "m.onnx"
    # dense or bitmask only (with every encoding allowed, Rice-coded gaps win here: tests/export/test_encoding.py)
    rep = export_onnx(int_densenet, path, sparse_weights=("bitmask",), samples=32, **FAST)
    assert rep.parity.passed
    model = onnx.load(str(path))
    assert [f.name for f in model.functions] == ["BitmaskDecode"]
    sparse = [w for w in rep.weights if w.encoding == "bitmask"]
    # bitmask wherever it is smaller: the 25%-dense convs and the 50%-dense FC, not the fully dense stem
    assert {w.module for w in rep.weights if w.encoding == "dense"} == {"stem"}
    assert len(sparse) == 5 and {w.storage for w in sparse} == {"INT4", "INT8"}
    assert sum(n.op_type == "BitmaskDecode" for n in model.graph.node) == len(sparse)
    inits = {t.name: t for t in model.graph.initializer}
    deploy = deploy_form(int_densenet)
    for w in sparse:
        codes = deploy.get_submodule(w.module).weight.numpy()
        assert len(inits[f"{w.module}.weight.mask"].raw_data) == math.ceil(codes.size / 8)
        nz_type = TensorProto.INT8 if w.module == "fc" else TensorProto.INT4
        assert inits[f"{w.module}.weight.nz"].data_type == nz_type
        np.testing.assert_array_equal(read_codes(model, f"{w.module}.weight"), codes)


def test_sparse_4bit_file_is_several_times_smaller_than_fp32_export(tmp_path):
    torch.manual_seed(0)
    model = compressed(models.create("densenet_bc:depth=22,growth=12", num_classes=100).eval())
    deploy = deploy_form(model)
    # sizes only: parity of each encoding is covered above
    int4 = export_onnx(model, tmp_path / "int4.onnx", verify=False, **FAST)
    bitmask = export_onnx(model, tmp_path / "bitmask.onnx", sparse_weights=True, verify=False, **FAST)
    fp32 = export_onnx(as_float_net(deploy), tmp_path / "fp32.onnx", verify=False, **FAST)
    # measured: fp32 324,422 B, dense INT4 64,223 B (5.05x), bitmask 53,605 B (6.05x); the unpruned
    # 6-bit FC (INT8 in the file) is a third of the compressed payload, which caps the ratios here
    assert fp32.file_bytes / int4.file_bytes > 4.5
    assert fp32.file_bytes / bitmask.file_bytes > 5.5


# with every encoding allowed this tiny net stays dense (a decoder function costs more than it saves)
@pytest.mark.parametrize("sparse", [False, ("bitmask",)], ids=["dense", "bitmask"])
def test_tampering_with_one_weight_fails_verification(int_densenet, tmp_path, sparse):
    path = tmp_path / "m.onnx"
    export_onnx(int_densenet, path, sparse_weights=sparse, samples=32, **FAST)
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    name = "blocks.1.conv.weight." + ("nz" if sparse else "codes")
    codes = onh.to_array(inits[name]).astype(np.int64)
    codes.flat[0] = 3 if codes.flat[0] != 3 else -3  # one code, one nibble
    inits[name].CopyFrom(onh.from_array(codes.astype(ml_dtypes.int4), name))
    onnx.save(model, str(path))
    report = verify_onnx(path, int_densenet, samples=32)
    assert not report.passed
    assert any("blocks.1.conv.weight" in f for f in report.failures)


def test_qdq_form_uses_quantize_dequantize_pairs_and_stays_exact(exact_densenet, tmp_path):
    path = tmp_path / "m.onnx"
    rep = export_onnx(exact_densenet, path, form="qdq", samples=64, **FAST)
    assert rep.parity.mode == "exact" and rep.parity.identical == 64
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Round" not in ops and ops.count("QuantizeLinear") == 6


def test_failed_verification_leaves_no_file(int_densenet, tmp_path, monkeypatch):
    from micronet.export import verify

    def broken(ort_out, ref, report):
        report.failures.append("injected mismatch")

    monkeypatch.setattr(verify, "compare_logits", broken)
    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"previous export")
    with pytest.raises(MicronetError, match="injected mismatch"):
        export_onnx(int_densenet, tmp_path / "new.onnx", samples=32, **FAST)
    with pytest.raises(MicronetError, match="failed verification"):
        export_onnx(int_densenet, existing, samples=32, force=True, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.onnx"]
    assert existing.read_bytes() == b"previous export"


def test_output_in_missing_directory_is_refused(int_densenet, tmp_path):
    with pytest.raises(MicronetError, match="does not exist"):
        export_onnx(int_densenet, tmp_path / "nope" / "m.onnx", verify=False)


def test_existing_file_needs_force(int_densenet, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"x")
    with pytest.raises(MicronetError, match="already exists.*--force"):
        export_onnx(int_densenet, path, verify=False)
    export_onnx(int_densenet, path, verify=False, force=True)
    assert onnx.load(str(path)).graph.output[0].name == "logits"


class _Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.GELU()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = torch.nn.functional.softplus(self.act(self.conv(x)))
        return self.fc(x.mean((2, 3)))


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.mean((2, 3)))


def test_unsupported_ops_are_named(tmp_path):
    with pytest.raises(MicronetError, match="cannot export these ops") as err:
        export_onnx(_Unsupported(), tmp_path / "m.onnx", verify=False)
    assert "GELU" in str(err.value) and "softplus" in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_data_dependent_control_flow_is_refused(tmp_path):
    with pytest.raises(MicronetError, match="does not trace"):
        export_onnx(_DataDependent(), tmp_path / "m.onnx", verify=False)


def test_report_has_sizes_and_latency(tmp_path):
    rep = export_onnx(IntDenseNet(), tmp_path / "m.onnx", samples=32, storage_bytes=4000)
    assert rep.storage_bytes == 4000 and rep.fp32_bytes > rep.file_bytes > 0
    assert set(rep.latency.onnxruntime) == set(rep.latency.pytorch) == {1, 64}
    text = rep.format()
    assert "scorer storage" in text and "latency" in text and "PASSED" in text


def test_verification_on_images_from_a_cifar100_folder(int_densenet, tmp_path):
    from tests.training.conftest import write_cifar100

    root = write_cifar100(tmp_path / "data", test_per_class=1)  # torchvision's on-disk format, 100 images
    rep = export_onnx(int_densenet, tmp_path / "m.onnx", data=root, samples=32, **FAST)
    assert rep.parity.passed and rep.parity.source == "data" and rep.parity.samples == 32
    with pytest.raises(MicronetError, match="holds no dataset"):
        export_onnx(int_densenet, tmp_path / "n.onnx", data=tmp_path, samples=8)
    assert not (tmp_path / "n.onnx").exists()


class _PadMaxPool(nn.Module):
    """Zero padding before a max pool on values that can be negative, plus the functional quantizer ops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        self.register_buffer("step", torch.tensor(0.1))

    def forward(self, x):
        from micronet.compress.ops import fake_quant

        x = torch.ops.micronet.round_clamp(self.conv(x) * 4, -8, 7)
        x = fake_quant(x, self.step, -8, 7) - 1.0
        x = torch.nn.functional.max_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1)), 3, 2)
        return self.fc(torch.flatten(x.mean([2, 3], keepdim=True), 1))


def test_zero_pad_before_max_pool_survives_onnxruntime_fusion(tmp_path):
    # onnxruntime fuses Pad into MaxPool's -inf padding; the exporter must not leave it that chance
    path = tmp_path / "m.onnx"
    rep = export_onnx(_PadMaxPool().eval(), path, samples=128, **FAST)
    assert rep.parity.passed and rep.parity.within_tol == 128
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Pad" not in ops and "Max" in ops and ops.count("Round") == 2


def test_a_batchnorm1d_on_2d_features_is_exported_folded_into_its_linear(tmp_path):
    # The exporter knows its input ([N, 3, 32, 32] -> 3072 features): the BN folds, no Mul/Add is left for it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3072, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)).eval()
    model[2].running_mean.normal_()
    model[2].running_var.uniform_(0.5, 2)
    path = tmp_path / "m.onnx"
    rep = export_onnx(model, path, samples=16, **FAST)
    assert rep.parity.passed
    assert [n.op_type for n in onnx.load(str(path)).graph.node if n.op_type in ("Gemm", "Mul", "Add")] == ["Gemm"] * 2
    x = torch.randn(4, 3, 32, 32)
    (out,) = _session(path).run(None, {_session(path).get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert np.allclose(out, model(x).numpy(), atol=1e-5)
    report = verify_onnx(path, model, samples=8)  # rebuilds the deploy form: the same folded weights
    assert report.passed and not report.failures
