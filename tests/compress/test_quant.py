import pytest
import torch
from torch import nn

from micronet.compress import (
    ActQuantizer,
    QuantConfig,
    SparsityConfig,
    calibrate_activations_,
    compression_summary,
    input_quantizer,
    least_squares_scale,
    prune_,
    quantize_,
    weight_quantizer,
)
from micronet.compress.ops import code_range
from micronet.errors import MicronetError


def test_weight_codes_at_most_2_pow_b_levels_per_channel_and_zeros_kept(tiny_densenet):
    prune_(tiny_densenet, SparsityConfig(0.75))
    zeros = {n: (m.weight == 0).clone() for n, m in tiny_densenet.named_modules() if isinstance(m, nn.Conv2d)}
    quantize_(tiny_densenet, QuantConfig(weight_bits=4, act_bits=None, fc_weight_bits=3))
    for name, m in tiny_densenet.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            bits = 3 if isinstance(m, nn.Linear) else 4
            w = m.weight.detach()
            for row in w.reshape(w.shape[0], -1):
                assert torch.unique(row).numel() <= 2**bits
            scale = weight_quantizer(m).scale.reshape(-1, *([1] * (w.dim() - 1)))
            codes = w / scale
            assert torch.allclose(codes, codes.round(), atol=1e-4)
            qmin, qmax = code_range(bits, signed=True)
            assert codes.round().min() >= qmin and codes.round().max() <= qmax
            if name in zeros:
                assert torch.all(w[zeros[name]] == 0)


def test_least_squares_beats_max_scaling_on_random_weights():
    torch.manual_seed(0)
    w = torch.randn(64, 288)
    qmin, qmax = code_range(4, signed=True)

    def mse(scale):
        s = scale[:, None]
        return float(((torch.clamp(torch.round(w / s), qmin, qmax) * s - w) ** 2).mean())

    max_scale = w.abs().amax(1) / 8
    ls_scale = least_squares_scale(w, 4)
    assert mse(ls_scale) < 0.95 * mse(max_scale)  # measured: 0.0120 vs 0.0132
    ratio = (w.abs().amax(1) / ls_scale).mean()
    assert 8.0 < float(ratio) < 9.6  # spec §3.5: the fit lands at max|w| / 8.3…9.4


def test_activation_quantizer_placement_and_max_calibration(tiny_densenet):
    torch.manual_seed(0)
    batch = torch.randn(16, 3, 32, 32)
    seen = []  # registered first, so it sees the conv's input before its quantizer does
    tiny_densenet.trans1.conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    quantize_(tiny_densenet, QuantConfig(weight_bits=None, act_bits=4), calibration_data=batch)
    assert input_quantizer(tiny_densenet.conv_stem) is None  # the image stays float
    assert input_quantizer(tiny_densenet.fc) is None  # and so does the classifier input
    q = input_quantizer(tiny_densenet.trans1.conv)
    assert q is not None and bool(q.calibrated) and not q.signed
    assert torch.isclose(q.scale, seen[0].max() / 15)  # max over the one calibration batch / (2^4 - 1)


def test_quantized_activations_take_at_most_16_levels(tiny_densenet):
    quantize_(tiny_densenet, QuantConfig(weight_bits=4, act_bits=4), calibration_data=torch.randn(8, 3, 32, 32))
    q = input_quantizer(tiny_densenet.trans1.conv)
    out = q(torch.randn(10_000) * 3)
    assert torch.unique(out).numel() <= 16
    assert torch.allclose(out / q.scale, (out / q.scale).round(), atol=1e-4)


def _calibrated(method: str, batches: list[torch.Tensor], **kw) -> ActQuantizer:
    q = ActQuantizer(4, method=method, **kw)
    q.calibrating = True
    for x in batches:
        q(x)
    q.finish_calibration_()
    return q


def _heavy_tailed_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4096, generator=g, dtype=torch.float64).float().abs() ** 3 for _ in range(3)]


def test_max_calibration_takes_the_first_batch_max_only():
    batches = _heavy_tailed_batches()
    q = _calibrated("max", batches)
    assert float(q.scale) == pytest.approx(float(batches[0].max()) / 15, rel=1e-6)  # the winner's one-batch rule


def test_percentile_calibration_clips_at_the_percentile_of_every_batch():
    import numpy as np

    batches = _heavy_tailed_batches()
    q = _calibrated("percentile", batches, percentile=99.0)
    expected = np.percentile(np.concatenate([b.numpy() for b in batches]).astype(np.float64), 99.0)
    assert float(q.scale) * 15 == pytest.approx(expected, rel=1e-4)
    assert float(q.scale) * 15 < 0.5 * max(float(b.max()) for b in batches)
    assert not q.signed


def test_mse_calibration_beats_clipping_at_max():
    batches = _heavy_tailed_batches()
    data = torch.cat(batches).double()

    def mse(top: float) -> float:
        step = top / 15
        return float(((torch.clamp(torch.round(data / step), 0, 15) * step - data) ** 2).mean())

    q = _calibrated("mse", batches)
    top, amax = float(q.scale) * 15, float(data.max())
    best = min(mse(amax * k / 1000) for k in range(100, 1001))  # a finer grid than the calibrator's
    assert top < 0.8 * amax and mse(top) < 0.8 * mse(amax)
    assert mse(top) <= 1.02 * best


def test_signed_activations_detected():
    q = ActQuantizer(4)
    q.calibrating = True
    q(torch.linspace(-2, 3, 100))
    q.finish_calibration_()
    assert q.signed and q.qrange == (-8, 7)


def test_lsq_scale_receives_gradient():
    q = ActQuantizer(4, learn_scale=True).train()
    q.scale.data.fill_(0.1)
    q.calibrated.fill_(True)
    x = (torch.rand(2, 8, 4, 4) * 3).requires_grad_()
    q(x).sum().backward()
    assert q.scale.grad is not None and float(q.scale.grad.abs()) > 0
    assert x.grad is not None


def test_quantizer_math_is_fp32_under_autocast():
    q = ActQuantizer(4)
    q.scale.data.fill_(0.1)
    x = torch.linspace(0, 1.5, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    expected = torch.clamp(torch.round(x.float() / 0.1), 0, 15) * 0.1
    assert torch.allclose(y.float(), expected, atol=1e-2)


@pytest.mark.parametrize("field", ["weight_bits", "act_bits", "fc_weight_bits"])
@pytest.mark.parametrize("bad", [0, 17, -4])
def test_bits_outside_1_to_16_are_errors(field, bad):
    with pytest.raises(MicronetError, match=field):
        QuantConfig(**{field: bad})


def test_summary_lists_layers(tiny_densenet):
    prune_(tiny_densenet, SparsityConfig(0.5))
    quantize_(tiny_densenet, QuantConfig(), calibration_data=torch.randn(4, 3, 32, 32))
    text = compression_summary(tiny_densenet)
    assert "trans1.conv" in text and "overall conv/linear sparsity" in text


@pytest.mark.parametrize("field", ["weight_bits", "act_bits", "fc_weight_bits"])
def test_bit_widths_are_2_to_16(field):
    # 1-bit signed codes are {-1, 0}: no positive value, so 2 bits is the floor everywhere (recipes included).
    for bad in (1, 17, 4.0, True):
        with pytest.raises(MicronetError, match=f"{field} must be an integer in 2..16"):
            QuantConfig(**{field: bad})
    assert getattr(QuantConfig(**{field: 2}), field) == 2 and getattr(QuantConfig(**{field: 16}), field) == 16


def test_calibration_shows_a_bar_only_when_asked(tiny_densenet, capsys):
    quantize_(tiny_densenet, QuantConfig(weight_bits=4, act_bits=4))
    batches = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    calibrate_activations_(tiny_densenet, batches)
    assert capsys.readouterr().err == ""  # off by default in the library
    calibrate_activations_(tiny_densenet, batches, progress=True)
    err = capsys.readouterr().err
    assert "activation calibration" in err  # (tqdm may skip the 3/3 frame of a fast, self-clearing bar)
