"""Issue 11 item 4: weight encodings (packed bit fields, bitmask, Rice-coded gaps) decoded by shared ONNX functions.

The oracle is onnxruntime, run here on a one-tensor model built from each encoding, against the codes the
test itself generated (and, for exports, the deploy form's codes); bit streams are checked against hand-made
examples. ``read_codes`` (the numpy reader the verifier uses) is checked against the same codes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as onh

from micronet import models
from micronet.compress import deploy_form
from micronet.export import encoding as enc
from micronet.export import export_onnx, verify_onnx
from tests.export.conftest import compressed

FAST = {"timing": False}


def _ort_decode(e: enc.Encoded, shape: tuple[int, ...], tmp_path) -> tuple[np.ndarray, list[str]]:
    """The float weight onnxruntime decodes from ``e`` (default session options) and the ops left after loading."""
    one = onh.from_array(np.array(1.0, np.float32), "one")
    graph = oh.make_graph(list(e.nodes), "t", [], [oh.make_tensor_value_info("w", TensorProto.FLOAT, list(shape))],
                          [one, *e.initializers])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21), oh.make_opsetid(enc.DECODER_DOMAIN, 1)],
                          functions=enc.functions(e.functions), ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (got,) = sess.run(["w"], {})
    unfolded = ort.SessionOptions()  # the decoder must also run as a graph, when nothing folds it
    unfolded.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    (plain,) = ort.InferenceSession(model.SerializeToString(), unfolded, providers=["CPUExecutionProvider"]).run(
        ["w"], {})
    np.testing.assert_array_equal(plain, got)
    return got, [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def _sparse(shape: tuple[int, ...], lo: int, hi: int, density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(lo, hi + 1, shape) * (rng.random(shape) < density)


LONG = np.zeros(5000, dtype=np.int64)
LONG[[4321, 4999]] = [7, -8]  # one gap of 4321 zeros, then 677: Rice picks a large k
CASES = {
    "4d_25pct": _sparse((12, 48, 3, 3), -8, 7, 0.25, 0),
    "all_zero": np.zeros((5, 7), dtype=np.int64),
    "all_dense": np.random.default_rng(1).integers(1, 8, (3, 4, 3, 3)),
    "single_element": np.array([-3]),
    "single_nonzero": np.array([0, 0, 5, 0]),
    "last_nonzero": np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 2]),
    "long_gaps": LONG,
    "1d_sparse": _sparse((1000,), -8, 7, 0.05, 2),
    "fc_6bit": _sparse((20, 64), -32, 31, 0.5, 3),
    "symmetric_4": _sparse((50, 50), -4, 4, 0.3, 4),  # 8 non-zero values: 3 bits once zero leaves the alphabet
    "constant": np.full((4, 4), 3),
    "int8_range": _sparse((16, 16), -128, 127, 0.4, 5),
}


def _variants(codes: np.ndarray) -> list[enc.Encoded]:
    found = [enc.encode_packed("w", codes, "one")]
    for packed in (False, True):
        found += [enc.encode_bitmask("w", codes, packed), enc.encode_rice("w", codes, packed),
                  enc.encode_rice("w", codes, packed, k=0), enc.encode_rice("w", codes, packed, k=3)]
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_every_encoding_decodes_bit_for_bit_in_onnxruntime_and_folds_at_load(case, tmp_path):
    codes = CASES[case].astype(np.int64)
    for e in _variants(codes):
        got, ops_left = _ort_decode(e, codes.shape, tmp_path)
        label = f"{e.encoding} {e.storage} {e.detail}"
        assert got.dtype == np.float32 and got.shape == codes.shape, label
        np.testing.assert_array_equal(got, codes.astype(np.float32), err_msg=label)
        # the whole decoder is constant-folded when the session is created; only the weight's DequantizeLinear
        # stays (onnxruntime keeps it on purpose, which keeps the weights away from conv fusions)
        assert ops_left == ["DequantizeLinear"], label
        model = onnx.helper.make_model(onnx.helper.make_graph(list(e.nodes), "t", [], [], list(e.initializers)))
        np.testing.assert_array_equal(enc.read_codes(model, "w"), codes, err_msg=label)


def test_rice_stream_matches_a_hand_coded_example():
    mask = np.array([0, 0, 1, 0, 0, 0, 0, 0, 1, 1], dtype=bool)
    # gaps 2, 5, 0; with k=1: remainders 0, 1, 0 first, then quotients 1, 2, 0 in unary (q zeros, then a one)
    bits = [0, 1, 0] + [0, 1] + [0, 0, 1] + [1]
    assert enc.rice_mask_bits(mask) == (len(bits), 1)  # k=0 and k=2 both take 10 bits
    e = enc.encode_rice("w", mask.astype(np.int64) * 5)
    gaps = next(t for t in e.initializers if t.name == "w.gaps")
    assert e.detail == "k=1" and list(onh.to_array(gaps)) == [0b10010010, 0b1]
    nz = next(t for t in e.initializers if t.name == "w.nz")
    assert nz.data_type == TensorProto.INT4 and list(onh.to_array(nz).astype(int)) == [5, 5, 5]


def test_packed_fields_match_a_hand_coded_example():
    codes = np.array([-32, 31, 0, -1])  # 6-bit fields of code + 32: 0, 63, 32, 31, little-endian, concatenated
    e = enc.encode_packed("w", codes, "one")
    stream = onh.to_array(next(t for t in e.initializers if t.name == "w.codes"))
    bits = [0] * 6 + [1] * 6 + [0, 0, 0, 0, 0, 1] + [1, 1, 1, 1, 1, 0]
    assert e.storage == "6-bit" and list(stream) == list(np.packbits(bits, bitorder="little"))
    nz = np.array([-4, -1, 1, 4])  # zero left out: 8 values in 3 bits, -4..-1 -> 0..3, 1..4 -> 4..7
    assert enc.field_layout(nz, nonzero=True) == enc.Fields(3, -4, True)
    assert list(enc.to_fields(nz, enc.Fields(3, -4, True))) == [0, 3, 4, 7]


def test_the_smallest_encoding_is_chosen_per_tensor():
    one = "one"
    assert enc.smallest("w", CASES["4d_25pct"], one, enc.ENCODINGS).encoding == "rice"
    assert enc.smallest("w", CASES["all_dense"], one, enc.ENCODINGS).encoding == "dense"
    # gaps 4321 and 677: k=10 codes quotients 4, 0 -> 4 + 2 * 11 = 26 bits; k=11 ties (2 + 2 * 12), k=9 takes 29
    assert enc.rice_mask_bits(CASES["long_gaps"] != 0) == (26, 10)
    assert enc.smallest("w", CASES["long_gaps"], one, enc.ENCODINGS).detail == "k=10"
    fc = enc.smallest("w", CASES["fc_6bit"], one, enc.ENCODINGS)
    assert fc.storage == "6-bit (no zero)" and fc.encoding in ("bitmask", "rice")
    for case, codes in CASES.items():  # never larger than dense, or than any other candidate
        sizes = [e.file_bytes for e in enc.candidates("w", codes, one, enc.ENCODINGS)]
        assert enc.smallest("w", codes, one, enc.ENCODINGS).file_bytes == min(sizes), case
    assert enc.smallest("w", CASES["4d_25pct"], one, ("dense", "bitmask")).encoding == "bitmask"
    wide = np.array([0, 0, 300, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # beyond int8: only dense holds it
    assert enc.smallest("w", wide, one, enc.ENCODINGS).encoding == "dense"


def _ort_weights(path, names: list[str]) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    for name in names:
        model.graph.output.append(oh.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"input": np.zeros((1, 3, 32, 32), np.float32)}
    return dict(zip(names, sess.run(names, feed)))


def test_a_decoder_function_is_written_only_where_its_users_save_more_than_it_costs(tmp_path):
    torch.manual_seed(0)
    model = compressed(models.create("densenet_bc:depth=10,growth=4", num_classes=10).eval())
    dense = export_onnx(model, tmp_path / "dense.onnx", verify=False, **FAST)
    rep = export_onnx(model, tmp_path / "sparse.onnx", sparse_weights=True, verify=False, **FAST)
    # measured: every tensor here saves tens of bytes at most, and each function costs 1-2 KB
    assert {w.encoding for w in rep.weights} == {"dense"} and rep.file_bytes == dense.file_bytes
    assert not onnx.load(str(tmp_path / "sparse.onnx")).functions


def test_sparse_export_decodes_the_deploy_forms_codes_and_computes_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = compressed(models.create("densenet_bc:depth=22,growth=12", num_classes=100).eval())
    deploy = deploy_form(model)
    dense = export_onnx(model, tmp_path / "dense.onnx", verify=False, **FAST)
    rep = export_onnx(model, tmp_path / "sparse.onnx", sparse_weights=True, verify=False, **FAST)
    assert rep.file_bytes < dense.file_bytes
    by_module = {w.module: w for w in rep.weights}
    fc = by_module.pop("fc.linear")
    assert fc.encoding == "packed" and fc.storage == "6-bit"  # the 6-bit FC, 98% dense: INT8 would waste 2 bits
    assert {w.encoding for w in by_module.values()} == {"rice"}  # the pruned 4-bit convs
    file = onnx.load(str(tmp_path / "sparse.onnx"))
    called = [n.op_type for n in file.graph.node if n.domain == enc.DECODER_DOMAIN]
    assert sorted(f.name for f in file.functions) == sorted(set(called))  # one shared function per encoding
    names = [f"{w.module}.weight" for w in rep.weights]
    decoded = _ort_weights(tmp_path / "sparse.onnx", names)
    for w in rep.weights:
        np.testing.assert_array_equal(decoded[f"{w.module}.weight"], deploy.get_submodule(w.module).weight.numpy())
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()

    def logits(path) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]

    np.testing.assert_array_equal(logits(tmp_path / "sparse.onnx"), logits(tmp_path / "dense.onnx"))


def test_a_damaged_rice_stream_fails_verification_with_the_layer_named(int_densenet, tmp_path):
    path = tmp_path / "m.onnx"
    rep = export_onnx(int_densenet, path, sparse_weights=("rice",), samples=32, **FAST)  # True: all dense here
    assert next(w for w in rep.weights if w.module == "blocks.1.conv").encoding == "rice"
    model = onnx.load(str(path))
    gaps = next(t for t in model.graph.initializer if t.name == "blocks.1.conv.weight.gaps")
    stream = onh.to_array(gaps).copy()
    stream[0] ^= 1  # the first remainder bit: the first non-zero moves by one, and every later one with it
    gaps.CopyFrom(onh.from_array(stream, gaps.name))
    onnx.save(model, str(path))
    report = verify_onnx(path, int_densenet, samples=32)
    assert not report.passed
    assert any("blocks.1.conv.weight" in f for f in report.failures)
