"""Fake quantization of weights and activations, living on the modules.

* ``WeightQuantizer`` is a parametrization of ``weight`` (registered after any ``WeightMask``, so pruned
  zeros stay exactly zero): symmetric signed codes in [-2^(b-1), 2^(b-1)-1], one scale per output
  channel (or per tensor). The scale starts at max|w| / 2^(b-1) and is refined by least squares
  (alternating codes and the optimal scale for fixed codes; the 2019 winner's method, spec §3.5).
  Gradients pass straight through (identity), as in the winner's shadow-weight scheme.
* ``ActQuantizer`` is a module attached as ``conv.input_quantizer`` and applied by a forward pre-hook.
  Unsigned (post-ReLU) or signed codes; its step is calibrated by max over one batch (faithful to the
  winner), a percentile, or MSE over several batches, and can then be learned (LSQ).
Both call the ``micronet::fake_quant`` custom op: fp32 arithmetic under autocast, no host syncs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from micronet.compress import state
from micronet.compress.ops import code_range, fake_quant
from micronet.errors import MicronetError

CALIBRATION_METHODS = ("max", "percentile", "mse")


#: Allowed bit widths. Codes are symmetric signed [-2^(b-1), 2^(b-1)-1] for weights (and for signed
#: activations): at 1 bit that is {-1, 0}, which cannot hold a positive value, so 2 bits is the floor.
MIN_BITS, MAX_BITS = 2, 16


def _check_bits(name: str, bits: int | None) -> None:
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS):
        raise MicronetError(f"{name} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


@dataclass(frozen=True)
class QuantConfig:
    """Which tensors to quantize and how. ``None`` bits leave that part unquantized.

    ``weight_bits`` applies to the selected conv layers, ``fc_weight_bits`` to the classifier the model declares,
    ``act_bits`` to the inputs of the selected convs (the first conv's input, i.e. the image, and the
    classifier's input stay float unless ``quantize_first_input`` / ``quantize_fc_input``).
    """

    weight_bits: int | None = 4
    act_bits: int | None = 4
    fc_weight_bits: int | None = None
    per_channel: bool = True
    refit_iters: int = 100
    weight_refit: str = "epoch"
    act_signed: bool | None = None
    act_calibration: str = "max"
    act_percentile: float = 99.99
    learn_act_scale: bool = False
    quantize_first_input: bool = False
    quantize_fc_input: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        _check_bits("fc_weight_bits", self.fc_weight_bits)
        if self.act_calibration not in CALIBRATION_METHODS:
            raise MicronetError(f"act_calibration must be one of {CALIBRATION_METHODS}, got {self.act_calibration!r}")
        if self.weight_refit not in ("epoch", "step", "never"):
            raise MicronetError(f"weight_refit must be 'epoch', 'step' or 'never', got {self.weight_refit!r}")
        if not (0.0 < self.act_percentile <= 100.0):
            raise MicronetError(f"act_percentile must be in (0, 100], got {self.act_percentile}")


def _channel_view(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


@torch.no_grad()
def least_squares_scale(w: Tensor, bits: int, per_channel: bool = True, iters: int = 100) -> Tensor:
    """Per-output-channel (or per-tensor) scale minimising ||w - s*q(w/s)||² by alternating refits."""
    qmin, qmax = code_range(bits, signed=True)
    rows = w.detach().float().reshape(w.shape[0], -1) if per_channel else w.detach().float().reshape(1, -1)
    amax = rows.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / (2 ** (bits - 1)), torch.ones_like(amax))
    codes = torch.clamp(torch.round(rows / scale[:, None]), qmin, qmax)
    for _ in range(iters):
        qq = (codes * codes).sum(1)
        new = torch.where(qq > 0, (rows * codes).sum(1) / qq.clamp_min(1e-30), scale)
        new = torch.where(new > 0, new, scale)
        new_codes = torch.clamp(torch.round(rows / new[:, None]), qmin, qmax)
        done = torch.equal(new_codes, codes)
        scale, codes = new, new_codes
        if done:
            break
    return scale


class WeightQuantizer(nn.Module):
    """Parametrization ``w -> scale * clamp(round(w / scale))`` with signed ``bits``-bit codes."""

    def __init__(self, weight: Tensor, bits: int, *, per_channel: bool = True, refit_iters: int = 100,
                 refit: str = "epoch") -> None:
        super().__init__()
        self.bits, self.signed, self.per_channel = int(bits), True, bool(per_channel)
        self.refit_iters, self.refit = int(refit_iters), refit
        shape = (weight.shape[0],) + (1,) * (weight.dim() - 1) if per_channel else (1,)
        self.register_buffer("scale", torch.ones(shape, dtype=torch.float32, device=weight.device))

    @property
    def qrange(self) -> tuple[int, int]:
        return code_range(self.bits, signed=True)

    @torch.no_grad()
    def refit_(self, w: Tensor) -> None:
        """Re-fit the scale to the (masked) dense weight ``w`` by least squares."""
        s = least_squares_scale(w, self.bits, self.per_channel, self.refit_iters)
        self.scale.copy_(s.reshape(self.scale.shape))

    def codes(self, w: Tensor) -> Tensor:
        """Integer codes of ``w`` (float tensor of exact integers)."""
        qmin, qmax = self.qrange
        return torch.clamp(torch.round(w.detach().float() / self.scale), qmin, qmax)

    def forward(self, w: Tensor) -> Tensor:
        qmin, qmax = self.qrange
        q = fake_quant(w.detach(), self.scale, qmin, qmax).to(w.dtype)
        return w + (q - w).detach()  # plain straight-through estimator

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"


class ActQuantizer(nn.Module):
    """Fake-quantizes a module's input; calibrate with ``calibrating=True`` forwards, then ``finish_calibration_``."""

    def __init__(self, bits: int, *, signed: bool | None = None, method: str = "max", percentile: float = 99.99,
                 learn_scale: bool = False) -> None:
        super().__init__()
        self.bits, self.method, self.percentile, self.learn_scale = int(bits), method, float(percentile), learn_scale
        self._signed_config = signed
        self.signed = bool(signed) if signed is not None else False
        if learn_scale:
            self.scale = nn.Parameter(torch.ones(()))
        else:
            self.register_buffer("scale", torch.ones(()))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.calibrating = False
        self._samples: list[Tensor] = []
        self._min = math.inf

    @property
    def qrange(self) -> tuple[int, int]:
        return code_range(self.bits, self.signed)

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self._observe(x)
            return x
        qmin, qmax = self.qrange
        scale = self.scale
        if self.learn_scale and self.training:
            # LSQ gradient scaling: value s, gradient g*ds, g = 1/sqrt(features * qmax).
            g = 1.0 / math.sqrt(max(x[0].numel(), 1) * qmax)
            scale = scale * g + (scale - scale * g).detach()
        return fake_quant(x, scale, qmin, qmax).to(x.dtype)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        flat = x.detach().float().reshape(-1)
        self._min = min(self._min, float(flat.min()))
        if self.method == "max" and self._samples:
            # Faithful to the 2019 winner: the step comes from one batch only.
            return
        if flat.numel() > 262_144:  # keep calibration memory bounded; a strided subsample is deterministic
            flat = flat[:: math.ceil(flat.numel() / 262_144)]
        self._samples.append(flat.abs() if self.method != "max" else flat.abs().amax().reshape(1))

    @torch.no_grad()
    def finish_calibration_(self) -> None:
        """Set the step from what was observed and leave calibration mode."""
        self.calibrating = False
        if not self._samples:
            raise MicronetError("activation quantizer saw no data during calibration")
        if self._signed_config is None:
            self.signed = self._min < 0
        qmax = self.qrange[1]
        data = torch.cat(self._samples)
        if self.method == "max":
            top = data.max()
        elif self.method == "percentile":
            top = torch.quantile(data[: 16_000_000], self.percentile / 100.0)
        else:
            top = self._mse_range(data, qmax)
        scale = (top / qmax) if float(top) > 0 else torch.tensor(1.0)
        self.scale.data.copy_(scale.reshape(()))
        self.calibrated.fill_(True)
        self._samples, self._min = [], math.inf

    def _mse_range(self, data: Tensor, qmax: int) -> Tensor:
        """Clipping range minimising the quantization MSE over the observed magnitudes (grid search)."""
        amax = data.max()
        best, best_err = amax, math.inf
        for frac in torch.linspace(0.2, 1.0, 41):
            s = (amax * frac / qmax).clamp_min(1e-12)
            err = float(((torch.clamp(torch.round(data / s), 0, qmax) * s - data) ** 2).mean())
            if err < best_err:
                best, best_err = amax * frac, err
        return best

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, method={self.method}, learn_scale={self.learn_scale}"


def _apply_input_quantizer(module: nn.Module, args: tuple):
    return (module.input_quantizer(args[0]), *args[1:])


def attach_input_quantizer(module: nn.Module, quantizer: ActQuantizer) -> None:
    """Attach ``quantizer`` as ``module.input_quantizer`` and apply it to the module's input."""
    if state.input_quantizer(module) is not None:
        module.input_quantizer = quantizer
        return
    module.input_quantizer = quantizer
    module.register_forward_pre_hook(_apply_input_quantizer)


def attach_weight_quantizer(module: nn.Module, bits: int, *, per_channel: bool = True, refit_iters: int = 100,
                            refit: str = "epoch") -> WeightQuantizer:
    """Register a ``WeightQuantizer`` on ``module.weight`` (after any mask) and fit its scale."""
    existing = state.weight_quantizer(module)
    if existing is not None:
        raise MicronetError("weight is already quantized")
    quantizer = WeightQuantizer(state.raw_weight(module), bits, per_channel=per_channel, refit_iters=refit_iters,
                                refit=refit)
    parametrize.register_parametrization(module, "weight", quantizer, unsafe=True)
    refit_weight_scales_(module)
    return quantizer


@torch.no_grad()
def refit_weight_scales_(model: nn.Module) -> None:
    """Least-squares refit of every weight quantizer's scale to its current masked dense weight."""
    for module in model.modules():
        quantizer = state.weight_quantizer(module)
        if quantizer is None:
            continue
        w = state.raw_weight(module)
        mask = state.weight_mask(module)
        if mask is not None:
            w = w * mask.mask.to(w.dtype)
        quantizer.refit_(w)


def quantize_(model: nn.Module, config: QuantConfig, calibration_data: Iterable[Tensor] | Tensor | None = None,
              ) -> nn.Module:
    """Attach weight and activation quantizers per ``config`` (in place); calibrate if data is given."""
    first = state.first_conv_name(model)
    convs = state.select_layers(model, ("conv",), config.include, config.exclude)
    fcs = state.select_layers(model, ("fc",), config.include, config.exclude)
    for name, module in convs:
        if config.weight_bits is not None:
            attach_weight_quantizer(module, config.weight_bits, per_channel=config.per_channel,
                                    refit_iters=config.refit_iters, refit=config.weight_refit)
        if config.act_bits is not None and (name != first or config.quantize_first_input):
            attach_input_quantizer(module, _act_quantizer(config))
    for _, module in fcs:
        if config.fc_weight_bits is not None:
            attach_weight_quantizer(module, config.fc_weight_bits, per_channel=config.per_channel,
                                    refit_iters=config.refit_iters, refit=config.weight_refit)
        if config.act_bits is not None and config.quantize_fc_input:
            attach_input_quantizer(module, _act_quantizer(config))
    if calibration_data is not None:
        calibrate_activations_(model, calibration_data)
    return model


def _run(model: nn.Module, batches: list, device: torch.device) -> None:
    for batch in batches:
        x = batch[0] if isinstance(batch, tuple | list) else batch
        model(x.to(device))


def _act_quantizer(config: QuantConfig) -> ActQuantizer:
    return ActQuantizer(config.act_bits, signed=config.act_signed, method=config.act_calibration,
                        percentile=config.act_percentile, learn_scale=config.learn_act_scale)


@torch.no_grad()
def calibrate_activations_(model: nn.Module, data: Iterable[Tensor] | Tensor, *, only_uncalibrated: bool = False,
                           ) -> int:
    """Run ``data`` (a batch or an iterable of batches) through ``model`` in eval mode to set activation steps.

    Returns the number of quantizers calibrated. The model's train/eval modes are restored afterwards.
    """
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)
                  and not (only_uncalibrated and bool(m.calibrated))]
    if not quantizers:
        return 0
    device = state.model_device(model)
    batches = [data] if isinstance(data, Tensor) else list(data)
    if not batches:
        raise MicronetError("calibration data is empty")
    with state.preserved_modes(model):
        try:
            for q in quantizers:
                q.calibrating = True
            model.eval()
            _run(model, batches, device)
            unseen = [q for q in quantizers if not q._samples]
            if unseen:
                # Conditional networks (SkipNet) skip blocks at eval; in train mode every block runs. BatchNorm
                # and dropout stay in eval mode so the statistics seen are those of inference.
                for q in quantizers:
                    q.calibrating = q in unseen
                model.train()
                for m in model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout):
                        m.eval()
                _run(model, batches, device)
            for q in quantizers:
                q.finish_calibration_()
        finally:
            for q in quantizers:
                q.calibrating = False
    return len(quantizers)
