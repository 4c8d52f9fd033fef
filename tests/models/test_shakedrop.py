"""ShakeDrop forward/backward rules (spec training.md §2.5)."""

import pytest
import torch
import torch.fx

from micronet.models.shakedrop import ShakeDrop, linear_decay

N = 64


def _per_sample(t):
    """The per-sample factor of a [N, C, H, W] result of a ones input, checking it is constant per sample."""
    flat = t.reshape(t.shape[0], -1)
    assert torch.all(flat == flat[:, :1])
    return flat[:, 0]


def test_dropped_branch_alpha_forward_beta_backward():
    torch.manual_seed(0)
    x = torch.ones(N, 3, 4, 4, requires_grad=True)
    y = ShakeDrop(1.0).train()(x)  # gate always 0: the branch is always "dropped"
    alpha = _per_sample(y.detach())
    assert torch.all(alpha >= -1) and torch.all(alpha <= 1)
    assert (alpha < 0).any() and (alpha > 0).any()
    y.sum().backward()
    beta = _per_sample(x.grad)
    assert torch.all(beta >= 0) and torch.all(beta <= 1)  # scaled, never negative
    assert not torch.allclose(beta, alpha)  # an independent draw, not the forward factor
    assert beta.std() > 0.1  # per sample, not one value per batch


def test_kept_branch_passes_unchanged():
    x = torch.randn(N, 3, 4, 4, requires_grad=True)
    y = ShakeDrop(0.0).train()(x)
    assert torch.equal(y, x)
    grad = torch.randn_like(x)
    y.backward(grad)
    assert torch.equal(x.grad, grad)


def test_gate_is_one_draw_per_batch_with_survival_one_minus_p():
    torch.manual_seed(1)
    module = ShakeDrop(0.25).train()
    x = torch.ones(N, 1, 1, 1)
    kept = 0
    for _ in range(400):
        factors = module(x).flatten()
        batch_kept = bool(torch.all(factors == 1))
        assert batch_kept or not torch.any(factors == 1)  # all samples share the batch's gate
        kept += batch_kept
    assert 260 <= kept <= 340  # Binomial(400, 0.75): mean 300, sd 8.7


@pytest.mark.parametrize("p_drop", [0.0, 0.3, 0.5])
def test_eval_scales_by_expectation(p_drop):
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ShakeDrop(p_drop).eval()(x), x * (1 - p_drop))


def test_linear_decay_rule():
    probs = linear_decay(90, 0.5)
    assert probs[0] == pytest.approx(0.5 / 90) and probs[-1] == 0.5 and len(probs) == 90


def test_bfloat16_autocast_keeps_dtype():
    x = torch.randn(4, 3, 2, 2, dtype=torch.bfloat16, requires_grad=True)
    y = ShakeDrop(0.5).train()(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16


def test_branch_free_and_fx_keeps_custom_backward():
    # Symbolic tracing fails on any Python branch on tensor values or .item(); the traced training
    # graph must still apply the beta rule (a plain trace would inline alpha into the backward).
    torch.manual_seed(2)
    traced = torch.fx.symbolic_trace(ShakeDrop(1.0).train())
    x = torch.ones(N, 2, 1, 1, requires_grad=True)
    traced(x).sum().backward()
    assert torch.all(x.grad >= 0)
