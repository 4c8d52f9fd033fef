"""Shake-Shake 26: exact sizes from the architecture, the shake rule, and the scorer/compression/exporter on it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from micronet import compress, models
from micronet.export import export_onnx
from micronet.models.shakeshake import shake_shake
from micronet.scoring import score


def _hand_count(width: int, num_classes: int, depth: int = 26) -> int:
    """Parameters of Shake-Shake-depth 2x{width}d, counted from the architecture by hand."""
    n = (depth - 2) // 6
    total = 3 * 9 * 16 + 2 * 16  # stem conv (no bias) + its BN
    c_in = 16
    for c in (width, 2 * width, 4 * width):
        for i in range(n):
            branch = 9 * c_in * c + 2 * c + 9 * c * c + 2 * c  # conv-BN-conv-BN
            total += 2 * branch
            if i == 0:  # projection shortcut: two 1x1 convs to c/2 each, BN(c)
                total += 2 * c_in * (c // 2) + 2 * c
            c_in = c
    return total + c_in * num_classes + num_classes  # fc with bias


@pytest.mark.parametrize("width, ten_classes, hundred_classes", [
    # Published sizes (AutoAugment paper, Shake-Shake paper): 2.9M, 26.2M, 35.7M. With 100 classes all three
    # round to them; with 10 classes 2x112d is 35.64M (0.16% below the published 35.7M).
    (32, 2_923_162, 2_934_772),
    (96, 26_192_922, 26_227_572),
    (112, 35_640_442, 35_680_852),
])
def test_parameter_counts_match_the_architecture(width, ten_classes, hundred_classes):
    assert _hand_count(width, 10) == ten_classes and _hand_count(width, 100) == hundred_classes
    for classes, expected in ((10, ten_classes), (100, hundred_classes)):
        with torch.device("meta"):
            model = models.create(f"shakeshake26_2x{width}d", num_classes=classes)
        assert models.count_params(model) == expected


def test_forward_uses_alpha_and_backward_uses_an_independent_beta():
    torch.manual_seed(0)
    n = 512
    a = torch.ones(n, 2, 3, 3, requires_grad=True)
    b = torch.zeros(n, 2, 3, 3, requires_grad=True)
    y = shake_shake(a, b, training=True)
    alpha = y.detach()[:, 0, 0, 0]  # y = alpha*1 + (1 - alpha)*0
    assert torch.equal(y.detach(), alpha.view(n, 1, 1, 1).expand_as(y))  # one alpha per sample
    y.sum().backward()
    beta = a.grad[:, 0, 0, 0]
    assert torch.equal(a.grad, beta.view(n, 1, 1, 1).expand_as(a.grad))
    assert torch.allclose(a.grad + b.grad, torch.ones_like(a.grad))  # (beta, 1 - beta)
    assert not torch.allclose(beta, alpha)  # the gradient is scaled by beta, not alpha
    assert 0 <= float(alpha.min()) and float(alpha.max()) <= 1 and 0 <= float(beta.min()) and float(beta.max()) <= 1
    assert abs(np.corrcoef(alpha.numpy(), beta.numpy())[0, 1]) < 0.15  # independent draws
    assert abs(float(alpha.mean()) - 0.5) < 0.05 and abs(float(beta.mean()) - 0.5) < 0.05


def test_eval_is_the_expectation_of_training():
    torch.manual_seed(1)
    a, b = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    assert torch.equal(shake_shake(a, b, training=False), (a + b) * 0.5)
    draws = torch.stack([shake_shake(a, b, training=True) for _ in range(4000)]).mean(0)
    assert torch.allclose(draws, (a + b) * 0.5, atol=0.05 * float((a - b).abs().max()))


def test_training_mode_traces_to_one_opaque_call_keeping_the_backward_rule():
    model = models.create("shakeshake:depth=8,width=4", num_classes=10)
    graph = torch.fx.symbolic_trace(model.train()).graph
    assert sum(1 for n in graph.nodes if n.op == "call_function" and "shake_shake_train" in str(n.target)) == 3


def test_depth_and_width_are_validated():
    with pytest.raises(Exception, match="depth must be 2 \\+ 6\\*n"):
        models.create("shakeshake:depth=27")
    with pytest.raises(Exception, match="positive even"):
        models.create("shakeshake:width=5")


def test_scorer_compression_and_export_work_on_a_tiny_shake_shake(tmp_path):
    torch.manual_seed(0)
    model = models.create("shakeshake:depth=8,width=4", num_classes=10).eval()
    dense = score(model)
    assert dense.params == score(compress.deploy_form(model)).params and dense.ops == score(
        compress.deploy_form(model)).ops
    compress.prune_(model, compress.SparsityConfig(0.5))
    compress.quantize_(model, compress.QuantConfig(weight_bits=4, act_bits=4), torch.randn(16, 3, 32, 32))
    small = score(model)
    assert small.params < dense.params / 4 and small.ops < dense.ops
    report = export_onnx(model, tmp_path / "ss.onnx", samples=16, timing=False)
    assert report.parity is not None and report.parity.passed
    # Our own onnxruntime run against the PyTorch model, independent of the exporter's verifier.
    x = torch.randn(5, 3, 32, 32)
    session = ort.InferenceSession(str(tmp_path / "ss.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch_logits = compress.deploy_form(model)(x).numpy()
    assert np.allclose(onnx_logits, torch_logits, atol=1e-3)
    assert (onnx_logits.argmax(1) == torch_logits.argmax(1)).all()
