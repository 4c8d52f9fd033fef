"""Fake quantization of weights and activations, living on the modules: ``quantize_`` and its helpers.

Weights get a ``WeightQuantizer`` parametrization (after any ``WeightMask``, so pruned zeros stay exactly
zero): symmetric signed codes in [-2^(b-1), 2^(b-1)-1], one scale per output channel (or per tensor),
started at max|w| / 2^(b-1) and refined by least squares (spec §3.5). Inputs get an ``ActQuantizer``
attached as ``module.input_quantizer`` and applied by a forward pre-hook, then calibrated. Both classes
live in :mod:`micronet.compress.parametrizations` and call the ``micronet::fake_quant`` custom op (fp32
arithmetic under autocast, no host syncs).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from micronet.compress import state
from micronet.compress.parametrizations import ActQuantizer, WeightQuantizer
from micronet.errors import MicronetError
from micronet.progress import progress_bar

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

    ``weight_bits`` applies to the selected layers of ``kinds`` ("conv", and "linear" for the other Linears of e.g.
    a ConvNeXt or a transformer), ``fc_weight_bits`` to the classifier the model declares, ``act_bits`` to the
    inputs of the selected layers (the first conv's input, i.e. the image, and the classifier's input stay float
    unless ``quantize_first_input`` / ``quantize_fc_input``).
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
    kinds: tuple[str, ...] = ("conv",)

    def __post_init__(self) -> None:
        if "fc" in self.kinds or not set(self.kinds) <= set(state.LAYER_KINDS):
            raise MicronetError(f"quantization kinds must be among 'conv', 'linear' (the classifier has its own "
                                f"fc_weight_bits), got {self.kinds!r}")
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        _check_bits("fc_weight_bits", self.fc_weight_bits)
        if self.act_calibration not in CALIBRATION_METHODS:
            raise MicronetError(f"act_calibration must be one of {CALIBRATION_METHODS}, got {self.act_calibration!r}")
        if self.weight_refit not in ("epoch", "step", "never"):
            raise MicronetError(f"weight_refit must be 'epoch', 'step' or 'never', got {self.weight_refit!r}")
        if not (0.0 < self.act_percentile <= 100.0):
            raise MicronetError(f"act_percentile must be in (0, 100], got {self.act_percentile}")


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
              *, progress: bool = False) -> nn.Module:
    """Attach weight and activation quantizers per ``config`` (in place); calibrate if data is given (``progress``:
    a bar over the calibration batches)."""
    first = state.first_conv_name(model)
    convs = state.select_layers(model, config.kinds, config.include, config.exclude)
    fcs = state.select_layers(model, ("fc",), config.include, config.exclude)
    about_to_quantize = [n for n, _ in convs if config.weight_bits is not None or config.act_bits is not None]
    about_to_quantize += [n for n, _ in fcs if config.fc_weight_bits is not None or config.quantize_fc_input]
    state.check_quantizable(model, about_to_quantize)
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
        calibrate_activations_(model, calibration_data, progress=progress)
    return model


def _run(model: nn.Module, batches: list, device: torch.device, desc: str, progress: bool) -> None:
    bar = progress_bar(len(batches), desc, progress, unit="batch")
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, tuple | list) else batch
            model(x.to(device))
            bar.update()
    finally:
        bar.close()


def _act_quantizer(config: QuantConfig) -> ActQuantizer:
    return ActQuantizer(config.act_bits, signed=config.act_signed, method=config.act_calibration,
                        percentile=config.act_percentile, learn_scale=config.learn_act_scale)


@torch.no_grad()
def calibrate_activations_(model: nn.Module, data: Iterable[Tensor] | Tensor, *, only_uncalibrated: bool = False,
                           progress: bool = False) -> int:
    """Run ``data`` (a batch or an iterable of batches) through ``model`` in eval mode to set activation steps.

    Returns the number of quantizers calibrated. The model's train/eval modes are restored afterwards.
    ``progress``: show a tqdm bar over the batches (off by default in the library; the CLI turns it on on a TTY).
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
            _run(model, batches, device, "activation calibration", progress)
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
                _run(model, batches, device, "activation calibration (blocks skipped at eval)", progress)
            for q in quantizers:
                q.finish_calibration_()
        finally:
            for q in quantizers:
                q.calibrating = False
    return len(quantizers)
