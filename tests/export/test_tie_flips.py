"""Issue 11: a real onnxruntime-only tie flip passes verification; a code off by 2 or a flip with no tie fails.

A float-input first conv is summed in different orders by onnxruntime and PyTorch. The test crafts image
patches whose float64 pre-quantizer value lies within a few ulp of a rounding tie k + 0.5, runs onnxruntime
itself (the conv output added as a graph output) to find the patches where onnxruntime's code differs from
float64's by one while PyTorch fp32's does not, and checks that the exporter's verifier calls those samples
tie flips at the quantizer. The negative controls edit the file so that onnxruntime's codes really are off
by 2, or off by 1 far from any tie, and the verifier must fail naming that quantizer.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import helper as oh
from onnx import numpy_helper as onh
from torch import nn

from micronet.compress.integer_modules import ChannelAffine, IntConv2d, IntLinear, RoundClamp
from micronet.export import export_onnx, verify_onnx
from micronet.export.verify import BATCH, ParityReport, Parting, compare_float64

N = BATCH  # one batch: PyTorch and onnxruntime pick their conv algorithm by shape, not by content
CRAFTED_FROM = 17  # crafted samples after the rows the dynamic-batch check re-runs at batches 1, 3 and 17
ROW = COL = 5  # the crafted output position of channel 0
CENTRE = (0, 1, 1)  # the tap (input channel, kernel row, kernel column) whose weight is 1


class TieNet(nn.Module):
    """Float-input 3x3 stem with integer codes -> 4-bit quantizer -> 1x1 integer conv -> pool -> 6-bit FC."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(-8, 8, (4, 3, 3, 3), generator=g).float()
        codes[(0, *CENTRE)] = 1.0  # one tap of weight 1 sets the crafted sum exactly
        self.stem = IntConv2d(codes, padding=1, weight_bits=4)
        self.quant = RoundClamp(0, 15)
        self.conv = IntConv2d(torch.randint(-8, 8, (8, 4, 1, 1), generator=g).float(), weight_bits=4)
        self.scale = ChannelAffine(torch.full((8,), 0.01), torch.zeros(8))
        self.fc = IntLinear(torch.randint(-32, 32, (10, 8), generator=g).float(), weight_bits=6)
        self.fc_scale = ChannelAffine(torch.full((10,), 0.1), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scale(self.conv(self.quant(self.stem(x))))
        return self.fc_scale(self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def _codes(v: np.ndarray) -> np.ndarray:
    return np.clip(np.round(v), 0, 15)


def _tensor_after(model: onnx.ModelProto, op: str) -> str:
    """Output name of the first node of type ``op`` (the stem's Conv, the quantizer's Round)."""
    return next(n for n in model.graph.node if n.op_type == op).output[0]


def _ort_values(model: onnx.ModelProto, names: list[str], x: torch.Tensor) -> list[np.ndarray]:
    """onnxruntime's values of ``names`` (added as graph outputs) and its logits, at batch N."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(oh.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([*names, "logits"], {"input": x.numpy()})


def _stems(net: TieNet, model: onnx.ModelProto, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stem's output as onnxruntime, PyTorch fp32 and float64 compute it."""
    got = _ort_values(model, [_tensor_after(model, "Conv")], x)[0]
    with torch.inference_mode():
        fp32 = net.stem(x).numpy()
    fp64 = F.conv2d(x.double(), net.stem.weight.double(), padding=1).numpy()
    return got, fp32, fp64


def _crafted_batch(net: TieNet) -> tuple[torch.Tensor, list[int]]:
    """N small random images; from CRAFTED_FROM on, each has one 3x3x3 patch of large values that cancel so the
    stem's float64 output at (channel 0, ROW, COL) is within a few ulp of k + 0.5 (k = 3..12)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, 32, 32, generator=g) * 0.25
    w = net.stem.weight[0].double()
    for i in range(CRAFTED_FROM, N):
        patch = (torch.randn(3, 3, 3, generator=g) * 4).float().double()  # fp32 values, exact in float64
        rest = (w * patch).sum() - patch[CENTRE]  # products of fp32 values and small codes are exact in float64
        patch[CENTRE] = float(np.float32(3 + i % 10 + 0.5 - float(rest)))
        x[i, :, ROW - 1 : ROW + 2, COL - 1 : COL + 2] = patch.float()
    return x, list(range(CRAFTED_FROM, N))


@pytest.fixture(scope="module")
def tie_export(tmp_path_factory):
    """TieNet exported (float input, so not bit-exact by construction), and its ONNX model."""
    torch.manual_seed(0)
    net = TieNet().eval()
    path = tmp_path_factory.mktemp("tie") / "tie.onnx"
    export_onnx(net, path, verify=False)
    return net, path, onnx.load(str(path))


def test_an_onnxruntime_only_tie_flip_passes_as_a_tie(tie_export):
    net, path, model = tie_export
    x, crafted = _crafted_batch(net)
    got, fp32, fp64 = _stems(net, model, x)
    ort_off, pt_off = _codes(got) != _codes(fp64), _codes(fp32) != _codes(fp64)
    # keep the crafted samples where only onnxruntime's code flips; restore the others to plain noise
    only_ort = [i for i in crafted if ort_off[i].any() and not pt_off[i].any()]
    assert len(only_ort) >= 2, "no onnxruntime-only flip: the two runtimes now sum the stem in the same order"
    keep = only_ort[:3]
    plain = torch.randn(N, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.25
    x = torch.stack([x[i] if i in keep or i < CRAFTED_FROM else plain[i] for i in range(N)])

    # the oracle, on the final batch: onnxruntime really flips one code by 1 at a tie, PyTorch does not
    got, fp32, fp64 = _stems(net, model, x)
    ort_off, pt_off = _codes(got) != _codes(fp64), _codes(fp32) != _codes(fp64)
    assert not pt_off.any()
    assert sorted(set(np.nonzero(ort_off)[0].tolist())) == keep
    for i in keep:
        assert np.argwhere(ort_off[i]).tolist() == [[0, ROW, COL]]
        v64, v = float(fp64[i, 0, ROW, COL]), float(got[i, 0, ROW, COL])
        boundary = np.floor(v64) + 0.5
        assert abs(v64 - boundary) <= 8 * np.spacing(np.float32(boundary))  # within a few ulp of k + 0.5
        assert abs(_codes(v) - _codes(v64)) == 1 and (v - boundary) * (v64 - boundary) <= 0
    with torch.inference_mode():
        pt_logits = net(x).numpy()
        logits64 = copy.deepcopy(net).double()(x.double()).numpy()
    ort_logits = _ort_values(model, [], x)[0]
    moved = np.abs(ort_logits - logits64).max(1)
    assert np.all(moved[keep] > 100 * np.abs(pt_logits - logits64).max())  # the flip reaches the logits

    report = verify_onnx(path, net, data=x, samples=N)
    assert report.passed, report.format()
    assert report.mode == "statistical" and report.tie_flips == len(keep) and report.tie_layers == ["quant"]
    assert report.near_float64 == N - len(keep)


def _edit_codes(model: onnx.ModelProto, delta: np.ndarray) -> onnx.ModelProto:
    """The same model with ``delta`` added to the quantizer's rounded values (before its Clip)."""
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    rounded = _tensor_after(edited, "Round")
    edited.graph.initializer.append(onh.from_array(delta.astype(np.float32), "code_delta"))
    for node in edited.graph.node:
        if node.op_type == "Clip" and node.input[0] == rounded:
            node.input[0] = "shifted_codes"
    index = next(i for i, n in enumerate(edited.graph.node) if n.op_type == "Round")
    edited.graph.node.insert(index + 1, oh.make_node("Add", [rounded, "code_delta"], ["shifted_codes"]))
    return edited


@pytest.mark.parametrize("step, phrase", [(2, "some by 2 (a tie flip is +-1)"), (1, "no rounding tie nearby")])
def test_a_code_off_by_two_or_a_flip_without_a_tie_fails_naming_the_quantizer(step, phrase, tie_export, tmp_path):
    net, _, model = tie_export
    x = torch.randn(N, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 0.25
    delta = np.zeros((1, 4, 32, 32))
    delta[0, 1, 9, 9] = step
    path = tmp_path / "edited.onnx"
    onnx.save(_edit_codes(model, delta), str(path))
    # the oracle: onnxruntime's codes now differ from float64's by ``step`` where the value is far from a tie
    rounded = _ort_values(onnx.load(str(path)), ["shifted_codes"], x)[0]
    fp64 = F.conv2d(x.double(), net.stem.weight.double(), padding=1).numpy()
    want = _codes(fp64)
    differs = np.clip(rounded, 0, 15) != want
    assert differs.any() and np.array_equal(np.argwhere(differs)[:, 1:], np.tile([1, 9, 9], (differs.sum(), 1)))
    if step == 1:  # float64's value is nowhere near the boundary between the two codes
        samples = np.flatnonzero(differs.any(axis=(1, 2, 3)))
        boundary = np.minimum(np.clip(rounded, 0, 15), want)[samples, 1, 9, 9] + 0.5
        assert np.abs(fp64[samples, 1, 9, 9] - boundary).min() > 1e-3

    report = verify_onnx(path, net, data=x, samples=N)
    assert not report.passed
    assert report.failures[0].startswith("sample ") and "first parts from float64 at 'quant'" in report.failures[0]
    assert phrase in report.failures[0], report.failures


def test_a_tie_flip_that_changes_the_class_fails_however_small_the_margin():
    rng = np.random.default_rng(0)
    ref64 = rng.normal(size=(N, 10))
    ref64[3, :2] = [2.0, 2.0 - 1e-3]  # float64's top-2 margin on sample 3: 1e-3
    pt = (ref64 + rng.normal(scale=1e-7, size=ref64.shape)).astype(np.float32)
    ort_out = (ref64 + rng.normal(scale=1e-7, size=ref64.shape)).astype(np.float32)
    ort_out[3, 1] += 0.01  # a flipped code moved class 1 above class 0: onnxruntime's top-1 is now wrong
    assert pt[3].argmax() == ref64[3].argmax() == 0 and ort_out[3].argmax() == 1
    flip = Parting("blocks.0.quant", True, "1 codes flipped at rounding ties")
    report = ParityReport("statistical", N, "synthetic", ["cpu"])
    compare_float64(ort_out, pt, ref64, report, lambda idx: {int(i): flip for i in idx})
    assert report.tie_flips == 1 and not report.passed
    assert report.failures == ["sample 3: onnxruntime's top-1 differs from the float64 reference's where PyTorch "
                               "fp32's agrees (after first parts from float64 at 'blocks.0.quant': 1 codes flipped "
                               "at rounding ties)"]
    # the same flip without the class change passes
    ort_out[3, 1] -= 0.01
    ort_out[3, 2] += 0.01
    report = ParityReport("statistical", N, "synthetic", ["cpu"])
    compare_float64(ort_out, pt, ref64, report, lambda idx: {int(i): flip for i in idx})
    assert report.passed and report.tie_flips == 1
