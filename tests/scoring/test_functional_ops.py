"""Functional ops are counted: F.relu, x + y, torch.cat, F.avg_pool2d, x.mean match their module twins."""

import torch

from micronet.scoring import score
from tests.scoring.nets import FunctionalTwin, ModuleTwin


def test_functional_twin_has_identical_totals():
    torch.manual_seed(0)
    modules = ModuleTwin().eval()
    functional = FunctionalTwin(modules).eval()
    x = torch.randn(1, 3, 8, 8)
    assert torch.allclose(modules(x), functional(x), atol=1e-5)
    a, b = score(modules, input_size=8), score(functional, input_size=8)
    assert (a.params, a.mults, a.adds, a.mults_raw, a.adds_raw) == (
        b.params,
        b.mults,
        b.adds,
        b.mults_raw,
        b.adds_raw,
    )

    def totals(report):  # rows differ (module-based: one per module; functional: all in the root)
        return {k: {f: v for f, v in d.items() if f != "layers"} for k, d in report.by_kind().items()}

    assert totals(a) == totals(b)
    kinds_b = b.by_kind()
    # Nothing is silently zero: the residual add (512 elements), ReLU, both pools are there.
    assert kinds_b["add"]["adds_raw"] == 8 * 8 * 8
    assert kinds_b["relu"]["mults_raw"] == 8 * 8 * 8
    assert kinds_b["avgpool"]["adds_raw"] == 16 * 16 * 3
    assert kinds_b["mean"]["adds_raw"] == 16 * 15
    assert not b.unknown_ops
    assert b.free_ops["aten::cat"] == 1


def test_tracing_leaves_no_trace():
    model = ModuleTwin().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = len(torch.nn.modules.module._global_forward_pre_hooks)
    score(model, input_size=8)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(torch.nn.modules.module._global_forward_pre_hooks) == hooks_before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_unknown_ops_are_reported_not_zeroed():
    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.cumsum(x, dim=1)

    report = score(Odd(), input_size=4)
    assert report.unknown_ops and report.unknown_ops[0]["op"] == "aten::cumsum"
    assert "aten::cumsum" in report.table()
