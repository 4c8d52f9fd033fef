"""The modules that carry a model's compression state (spec: docs/architecture.md, "the protocol").

* ``WeightMask``: parametrization ``w -> w * mask`` (pruning, :mod:`micronet.compress.sparsity`).
* ``WeightQuantizer``: parametrization ``w -> scale * clamp(round(w / scale))``, registered after any mask
  so pruned zeros stay exactly zero; the scale is fitted by least squares (the 2019 winner's method,
  spec §3.5). Gradients pass straight through.
* ``ActQuantizer``: a submodule ``module.input_quantizer`` that fake-quantizes the module's input; its
  step is calibrated by max over one batch, a percentile or MSE, and can then be learned (LSQ).

They live here, apart from the functions that attach them (:mod:`~micronet.compress.sparsity`,
:mod:`~micronet.compress.quant`), so that :mod:`~micronet.compress.state`, which reads them, sits below
both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from micronet.compress.ops import code_range, fake_quant
from micronet.errors import MicronetError


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask``; ``mask`` is a bool buffer of the weight's full shape."""

    def __init__(
        self,
        mask: Tensor,
        *,
        sparsity: float,
        group: str,
        gradient: str = "dense",
        block: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))
        self.sparsity, self.group, self.gradient = float(sparsity), group, gradient
        self.block = tuple(block) if block is not None else None
        self.frozen = False

    def forward(self, w: Tensor) -> Tensor:
        m = self.mask.to(w.dtype)
        if self.gradient == "masked":
            return w * m
        # Value w*m, gradient identity: pruned weights keep learning and may regrow before freezing.
        return w - (w * (1 - m)).detach()

    def extra_repr(self) -> str:
        density = float(self.mask.float().mean()) if self.mask.numel() else 1.0
        return f"density={density:.4f}, group={self.group!r}, gradient={self.gradient}, block={self.block}"


@torch.no_grad()
def least_squares_scale(w: Tensor, bits: int, per_channel: bool = True, iters: int = 100) -> Tensor:
    """Per-output-channel (or per-tensor) scale minimising ||w - s*q(w/s)||² by alternating refits."""
    qmin, qmax = code_range(bits, signed=True)
    rows = w.detach().float().reshape(w.shape[0], -1) if per_channel else w.detach().float().reshape(1, -1)
    amax = rows.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / (2 ** (bits - 1)), torch.ones_like(amax))
    codes = torch.clamp(torch.round(rows / scale[:, None]), qmin, qmax)
    # A fixed number of rounds, no early exit: testing for convergence would read back to the host on every
    # round (a sync per layer on CUDA), and once the codes stop changing every further round is a fixed point.
    for _ in range(iters):
        qq = (codes * codes).sum(1)
        new = torch.where(qq > 0, (rows * codes).sum(1) / qq.clamp_min(1e-30), scale)
        scale = torch.where(new > 0, new, scale)
        codes = torch.clamp(torch.round(rows / scale[:, None]), qmin, qmax)
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
