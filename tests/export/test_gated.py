"""Gated PyramidSkipNet to ONNX: one If per gate; decisions and top-1 equal PyTorch's; a shut gate's block
is not executed at batch 1 (onnxruntime's own profile shows it); batch > 1 selects per sample."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from micronet import models
from micronet.compress import deploy_form
from micronet.compress.pixel_input import pixel_input_of
from micronet.data import get_normalization
from micronet.errors import MicronetError
from micronet.export import export_onnx
from micronet.export.gated import verify_gates
from tests.export.conftest import compressed

TINY = "pyramidskipnet:depth=20,alpha=8"  # 3 gates


def _inputs(n: int, seed: int = 1) -> torch.Tensor:
    """Images whose brightness and contrast vary, so the gates decide differently per image."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, 1, 1, generator=g) * 2
    shift = (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 2
    return torch.randn(n, 3, 32, 32, generator=g) * scale + shift


def _gated(bias: float | None = None, compress: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.create(TINY, num_classes=10)
    with torch.no_grad():
        for gate in model.gates:  # sharper gates: decisions that differ from image to image
            gate.conv.weight.mul_(30)
        model.controller.proj.weight.mul_(10)
    if compress:  # after sharpening, so the quantizers fit the weights they quantize
        model = compressed(model)
    with torch.no_grad():
        if bias is None:  # centre the gates on these images: about half of the decisions open
            model.eval()(_inputs(64))
            bias = -float(torch.logit(torch.stack(model.gate_probs)).median())
        model.controller.proj.bias.add_(bias)
    return model.eval()


def _decisions(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's per-image decisions [N, gates] and logits (eval: threshold 0.5, per image in any batch)."""
    with torch.inference_mode():
        logits = model(x).numpy()
    return model.executed().T.numpy().astype(np.float32), logits


@pytest.mark.parametrize("compress", [False, True], ids=["float", "int4"])
def test_exported_gates_and_top1_match_pytorch_on_every_input(tmp_path, compress):
    model = _gated(compress=compress)
    # int4: 512 samples, as the statistical parity rule (99% of logits within 1e-4) is specified for >= 512
    # (a 4-bit activation may round differently in one image of a hundred); float: fewer suffice
    n = 512 if compress else 128
    report = export_onnx(model, tmp_path / "m.onnx", samples=n, data=_inputs(n), timing=False)
    assert any(note.startswith(f"gates: {n}/{n} samples") for note in report.notes), report.notes
    assert any(note.endswith("decisions 64/64 in one batch of 64") for note in report.notes), report.notes
    assert any("at batch > 1 a block runs for the whole batch" in note for note in report.notes)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert sum(n.op_type == "If" for n in proto.graph.node) == 3
    # independent check: onnxruntime run here, against the PyTorch deploy form image by image
    x = _inputs(100, seed=2)
    want_gates, want_logits = _decisions(deploy_form(model).eval(), x)
    assert len(np.unique(want_gates, axis=0)) > 1 and 0 < want_gates.mean() < 1  # the decisions really vary
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = [sess.run(None, {"input": x[k : k + 1].numpy()}) for k in range(len(x))]
    got_logits, got_gates = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
    np.testing.assert_array_equal(got_gates, want_gates)  # 100% of decisions
    assert (got_logits.argmax(1) == want_logits.argmax(1)).all()  # 100% top-1
    # batch > 1: the same per-image decisions and logits (the block runs for all, Where keeps it per image)
    logits, gates = sess.run(None, {"input": x[:16].numpy()})
    np.testing.assert_array_equal(gates, want_gates[:16])
    np.testing.assert_allclose(logits, want_logits[:16], atol=1e-4)


class _WrongWhenBatched:
    """An onnxruntime session whose gate decisions are right at batch 1 and flipped for one image otherwise."""

    def __init__(self, session):
        self.session = session

    def run(self, names, feeds):
        outputs = self.session.run(names, feeds)
        if len(feeds["input"]) > 1:
            outputs = [out.copy() for out in outputs]
            outputs[names.index("gates")][3, 0] = 1 - outputs[names.index("gates")][3, 0]
        return outputs


def test_verify_gates_checks_one_batched_run_too(tmp_path):
    model = _gated()
    export_onnx(model, tmp_path / "m.onnx", samples=8, data=_inputs(8), timing=False)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = _inputs(40, seed=3)
    good = verify_gates(sess, deploy_form(model), x, batch=16)
    assert (good.batched_samples, good.batched_agree, good.failures) == (16, 16, [])
    assert good.format().endswith("decisions 16/16 in one batch of 16")
    bad = verify_gates(_WrongWhenBatched(sess), deploy_form(model), x, batch=16)
    assert (bad.decisions_agree, bad.top1_agree, bad.batched_agree) == (40, 40, 15)  # batch 1 alone passes
    assert bad.failures == ["gate decisions differ on 1/16 samples in one batch of 16"]


def _executed_nodes(path, x: np.ndarray, prefix: str) -> list[str]:
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    sess.run(None, {"input": x})
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    return [e["name"] for e in events if e.get("cat") == "Node"]


def test_a_shut_gate_runs_none_of_its_blocks_ops_at_batch_1(tmp_path):
    x = _inputs(1).numpy()
    executed = {}
    for state, bias in (("shut", -60.0), ("open", 60.0)):
        path = tmp_path / f"{state}.onnx"
        export_onnx(_gated(bias=bias), path, samples=8, data=_inputs(8), timing=False)
        executed[state] = _executed_nodes(path, x, tmp_path / state)
    block_convs = {s: [n for n in names if ".then/Conv" in n] for s, names in executed.items()}
    # every gated block's convolutions (3 per bottleneck) run when open, none when shut
    assert {n.split(".then/")[0] for n in block_convs["open"]} == {"layer2.1", "layer3.0", "layer3.1"}
    assert len(block_convs["open"]) >= 9 and block_convs["shut"] == []
    assert any(".else/" in n for n in executed["shut"]) and not any(".else/" in n for n in executed["open"])
    # and the shut model is the faster one: fewer convolutions in total
    convs = {s: sum("Conv" in n for n in names) for s, names in executed.items()}
    assert convs["shut"] + 9 <= convs["open"]


# ------------------------------------------------------------------------------------------------- pixel input

CIFAR = get_normalization("cifar100")


def _pixel_images(n: int, seed: int = 5) -> torch.Tensor:
    """uint8 images whose brightness and contrast vary (the gates then decide differently per image)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, 1, 1, generator=g) * 80
    shift = 40 + torch.rand(n, 3, 1, 1, generator=g) * 175
    return (torch.randn(n, 3, 32, 32, generator=g) * scale + shift).round().clamp(0, 255).to(torch.uint8)


def _pixel_gated() -> torch.nn.Module:
    """The compressed tiny SkipNet, its gates centred on the normalised pixel images (about half open)."""
    model = _gated(bias=0.0, compress=True)
    with torch.no_grad():
        model(CIFAR(_pixel_images(64), torch.float32))
        model.controller.proj.bias.sub_(float(torch.logit(torch.stack(model.gate_probs)).median()))
    return model


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_pixel_input_gated_export_is_bit_identical_on_512_images(tmp_path, layout):
    model = _pixel_gated()
    path = tmp_path / "px.onnx"
    report = export_onnx(model, path, input="pixels", layout=layout, normalization="cifar100", samples=64,
                         timing=False)
    assert report.parity.passed and report.input["layout"] == layout
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert sum(n.op_type == "If" for n in proto.graph.node) == 3
    # oracle: the PyTorch pixel deploy form (NCHW), image by image decisions; onnxruntime run here
    pixel_deploy = deploy_form(model, input="pixels", normalization=CIFAR)
    assert pixel_input_of(pixel_deploy.conv_stem) is not None  # the pixel-input first layer sits in the stem
    x = _pixel_images(512, seed=6)
    want_gates, want_logits = _decisions(pixel_deploy, x)
    assert len(np.unique(want_gates, axis=0)) > 1 and 0.1 < want_gates.mean() < 0.9  # the decisions really vary
    feed = x.permute(0, 2, 3, 1).contiguous() if layout == "nhwc" else x
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    one = [sess.run(None, {"input": feed[k : k + 1].numpy()}) for k in range(len(x))]  # batch 1: If really skips
    np.testing.assert_array_equal(np.concatenate([o[1] for o in one]), want_gates)
    np.testing.assert_array_equal(np.concatenate([o[0] for o in one]), want_logits)  # bit-identical
    batched = [sess.run(None, {"input": feed[i : i + 64].numpy()}) for i in range(0, len(x), 64)]  # Where path
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batched]), want_gates)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batched]), want_logits)


def test_pixel_input_gated_form_changes_only_the_stem_and_the_float64_head():
    """The gated blocks are today's: the pixel form's stem output equals the float form's on the normalised image
    (up to fp32 rounding of the first layer), and every block module is the float form's."""
    model = _pixel_gated()
    pixel_deploy = deploy_form(model, input="pixels", normalization=CIFAR)
    float_deploy = deploy_form(model)
    x = _pixel_images(32, seed=7)
    with torch.inference_mode():
        got = pixel_deploy.bn_stem(pixel_deploy.conv_stem(x))
        want = float_deploy.bn_stem(float_deploy.conv_stem(CIFAR(x, torch.float32)))
    assert got.dtype == torch.float32 and (got - want).abs().max() <= 1e-4 * want.abs().max()
    for name in model.gated_block_names():
        a, b = pixel_deploy.get_submodule(name).state_dict(), float_deploy.get_submodule(name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_gated_network_without_an_input_module_has_no_pixel_form(monkeypatch):
    model = _gated()
    monkeypatch.setattr(type(model), "input_module", None)
    with pytest.raises(MicronetError, match=r"gated networks \(PyramidSkipNet\) that do not declare input_module"):
        deploy_form(model, input="pixels", normalization=CIFAR)
