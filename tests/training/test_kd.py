"""The distillation loss: direction, temperature, CE weight, numerics from log-softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from micronet.training.kd import KDConfig, kd_loss, kl_divergence


def test_reverse_is_kl_student_teacher_and_forward_the_other_way():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    ps, pt = s.softmax(1), t.softmax(1)
    reverse = (ps * (ps.log() - pt.log())).sum(1).mean()
    forward = (pt * (pt.log() - ps.log())).sum(1).mean()
    assert torch.allclose(kl_divergence(s, t, "reverse"), reverse, atol=1e-6)
    assert torch.allclose(kl_divergence(s, t, "forward"), forward, atol=1e-6)
    assert torch.allclose(kl_divergence(s, t, "forward"), F.kl_div(s.log_softmax(1), t.log_softmax(1),
                                                                  log_target=True, reduction="batchmean"))


def test_identical_logits_give_zero_and_extreme_logits_stay_finite():
    x = torch.randn(4, 100)
    assert kl_divergence(x, x).abs() < 1e-6
    extreme = torch.tensor([[1000.0, -1000.0, 0.0]])
    assert torch.isfinite(kl_divergence(extreme, -extreme, "reverse"))


def test_temperature_squared_scaling_and_ce_weight():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(10, (8,), generator=g)
    hot = kd_loss(s, t, y, KDConfig(temperature=4.0))
    assert torch.allclose(hot, 16 * kl_divergence(s, t, "reverse", 4.0))
    mixed = kd_loss(s, t, y, KDConfig(ce_weight=0.5))
    assert torch.allclose(mixed, kl_divergence(s, t) + 0.5 * F.cross_entropy(s, y))


def test_gradient_reaches_the_student_only():
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    kd_loss(s, t, None, KDConfig()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
