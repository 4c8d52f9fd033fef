"""SkipNet gating (spec training.md §2.6): gate layers, the shared LSTM controller, and gate decisions.

A gated network mixes in :class:`GatedNetwork`: every gate turns an execution probability p (per sample)
into a decision m through :meth:`GatedNetwork.decide`, which is the one place gate behaviour is chosen:

==========================  ==================================================================
mode                        m
==========================  ==================================================================
eval                        1[p > 0.5] (threshold; a skipped block is not computed)
train (``skip-sp``)         1[p > 0.5] forward, straight-through gradient dm/dp = 1
train, ``gate_sampling``    a ~ Bernoulli(p), no gradient through m (``skip-rl``: REINFORCE)
``force_gates`` True/False  every gate open / shut (worst-case scoring, export timing)
==========================  ==================================================================

The last forward's probabilities and decisions are kept (``gate_probs``, ``gate_masks``: one [N] tensor
per gate) for the policy-gradient loss and for reports; :class:`GateStats` turns decisions into per-gate
rates, executed blocks and MACs per image with their distributions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from micronet.models.summary import macs_by_module

LSTMState = tuple[torch.Tensor, torch.Tensor]


class GateFeatures(nn.Module):
    """Global average pool then a 1x1 conv (with bias) C -> `features`: one gate's view of a block output."""

    def __init__(self, in_channels: int, features: int = 10) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(in_channels, features, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.conv(self.pool(x)), 1)


class GateController(nn.Module):
    """One LSTM shared by all gates (hidden state carried from gate to gate), then Linear -> sigmoid."""

    def __init__(self, features: int = 10, hidden: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=1)
        self.proj = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor, state: LSTMState | None) -> tuple[torch.Tensor, LSTMState]:
        """Execution probability p of shape [N] for features [N, F], in the controller's own dtype (float32 unless the
        model was made float64); `state=None` starts from zeros."""
        # Always float32, also under the amp stages' autocast: in bf16 (8 mantissa bits) sigmoid saturates to
        # exactly 1 from a logit of about 6.2, so log(1 - p) of the RL loss and the STE gradient p(1 - p)
        # would degenerate, and a p near 0.5 would round across the threshold. The controller is tiny.
        device = features.device.type
        fp32 = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()
        with fp32:
            out, state = self.lstm(features.to(self.proj.weight.dtype).unsqueeze(0), state)
            return torch.sigmoid(self.proj(out.squeeze(0))).squeeze(1), state


def hard_gate(p: torch.Tensor) -> torch.Tensor:
    """m = 1[p > 0.5] in the forward pass, dm/dp = 1 in the backward pass (straight-through estimator)."""
    # p - p.detach() is exactly zero, so the forward value is exactly 0 or 1.
    return (p > 0.5).to(p.dtype) + (p - p.detach())


#: One piece of a gated network's forward: ``piece(root, x)``, with ``root`` holding the network's children.
Piece = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GatedPlan:
    """A gated forward cut into traceable pieces (for exporters that emit one conditional per gate).

    ``stem`` runs up to the first gate; gate i computes ``features[i]`` of the current tensor, feeds them to
    the LSTM controller (module ``controller``) and, if it opens, replaces the tensor by ``blocks[i]`` of it,
    else by ``skips[i]`` (the block's parameter-free shortcut); ``head`` makes the logits.
    """

    stem: Piece
    features: tuple[Piece, ...]
    blocks: tuple[Piece, ...]
    skips: tuple[Piece, ...]
    head: Piece
    block_names: tuple[str, ...]
    controller: str = "controller"


class GatedNetwork:
    """Mixin for networks whose blocks are skipped per input by gates (with ``nn.Module``).

    Subclasses call :meth:`_init_gates` in ``__init__``; in the forward pass :meth:`_begin_gated_forward`,
    :meth:`decide` once per gate, then :meth:`_end_gated_forward`; and name their gated blocks in
    :meth:`gated_block_names`.
    """

    #: Submodules that make up the gate network (features and controller): its cost is reported apart.
    gate_module_names: tuple[str, ...] = ("gates", "controller")
    is_dynamic = True

    def _init_gates(self, num_gates: int) -> None:
        # Modes, not architecture: plain attributes, never in a checkpoint; stages set them each time.
        self.gate_sampling = False
        self.force_gates: bool | None = None
        # Non-persistent: run statistics, not part of the architecture or of checkpoints.
        self.register_buffer("gate_executed", torch.zeros(num_gates, dtype=torch.long), persistent=False)
        self.register_buffer("gate_seen", torch.zeros((), dtype=torch.long), persistent=False)
        self.gate_masks: list[torch.Tensor] = []
        self.gate_probs: list[torch.Tensor] = []
        self._pending: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    @property
    def num_gates(self) -> int:
        """Number of gates (= number of skippable blocks)."""
        return int(self.gate_executed.numel())

    def gated_block_names(self) -> list[str]:
        """Module names of the gated blocks, gate i deciding block i."""
        raise NotImplementedError

    def gated_plan(self) -> GatedPlan:
        """This network's forward cut at its gates (see :class:`GatedPlan`)."""
        raise NotImplementedError

    def decide(self, p: torch.Tensor) -> torch.Tensor:
        """The decision m in {0, 1} (per sample, same dtype as ``p``) for execution probabilities ``p``."""
        if self.training and self.gate_sampling:
            mask = torch.bernoulli(p.detach())
        else:
            mask = hard_gate(p)
        if self.force_gates is not None:  # after the comparison, so a forced forward costs what a free one does
            mask = torch.full_like(mask.detach(), float(self.force_gates))
        probs, masks = self._pending
        probs.append(p)
        masks.append(mask)
        return mask

    def __getstate__(self) -> dict[str, Any]:
        # The last forward's records may be non-leaf tensors (deepcopy refuses those) and are no state.
        state = super().__getstate__()
        state.update(gate_masks=[], gate_probs=[], _pending=([], []))
        return state

    def _begin_gated_forward(self) -> None:
        # Started afresh each forward: an aborted one (e.g. a failed fx trace) must leave nothing behind.
        self._pending = ([], [])

    def _end_gated_forward(self, batch: int) -> None:
        self.gate_probs, self.gate_masks = self._pending
        self._pending = ([], [])
        if not self.training and self.gate_masks:
            self.gate_executed += (torch.stack(self.gate_masks) > 0.5).sum(dim=1)
            self.gate_seen += batch

    def executed(self) -> torch.Tensor:
        """Boolean [gates, N]: which gated blocks ran for each sample of the last forward."""
        if not self.gate_masks:
            raise RuntimeError("executed() needs a forward pass first")
        return torch.stack([m.detach() > 0.5 for m in self.gate_masks])

    def gate_penalty(self) -> torch.Tensor:
        """Sum over gates of the batch-mean gate value of the last forward (differentiable via the STE)."""
        if not self.gate_masks:
            raise RuntimeError("gate_penalty() needs a forward pass first")
        return torch.stack([mask.mean() for mask in self.gate_masks]).sum()

    def gate_rates(self) -> list[float]:
        """Fraction of samples for which each gated block ran, over eval forwards since the last reset
        (NaN before any eval forward)."""
        seen = int(self.gate_seen)
        if seen == 0:
            return [math.nan] * self.num_gates
        return (self.gate_executed.double() / seen).tolist()

    def reset_gate_stats(self) -> None:
        """Zero the execution counters behind `gate_rates()`."""
        self.gate_executed.zero_()
        self.gate_seen.zero_()

    def gate_macs(self, input_size: tuple[int, int, int] = (3, 32, 32)) -> tuple[int, list[int], int]:
        """Dense MACs per image: (every gate shut, each gated block's own, the gate network's share of both)."""
        per_module = macs_by_module(self, input_size)
        blocks = self.gated_block_names()
        block_macs = [sum(v for k, v in per_module.items() if _under(k, name)) for name in blocks]
        gate_net = sum(v for k, v in per_module.items() if any(_under(k, g) for g in self.gate_module_names))
        return sum(per_module.values()) - sum(block_macs), block_macs, gate_net


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def is_gated(model: nn.Module) -> bool:
    """Whether ``model`` (or the module DDP/compile wraps) has SkipNet-style gates."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return isinstance(model, GatedNetwork)


class GateStats:
    """Accumulates gate decisions: per-gate rates, executed blocks and MACs per image, and their histograms.

    All state is one float64 vector (``state``), so ranks can sum it with one all-reduce.
    """

    def __init__(self, base_macs: int, block_macs: list[int], bins: int = 20) -> None:
        self.base_macs, self.block_macs, self.bins = base_macs, list(block_macs), bins
        self.gates = len(block_macs)
        self._macs = torch.tensor(block_macs, dtype=torch.float64)
        size = self.gates + 1 + (self.gates + 1) + 1 + bins  # executed per gate, images, block hist, mac sum, hist
        self.state = torch.zeros(size, dtype=torch.float64)

    @classmethod
    def for_model(cls, model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32), bins: int = 20
                  ) -> GateStats:
        """Statistics sized for ``model``'s gates, with its dense MACs per gated block."""
        base, blocks, _ = model.gate_macs(input_size)
        return cls(base, blocks, bins)

    @property
    def max_macs(self) -> int:
        """MACs of an image with every gate open."""
        return self.base_macs + sum(self.block_macs)

    def update(self, executed: torch.Tensor) -> None:
        """Add a batch of decisions: boolean [gates, N]."""
        ran = executed.detach().to("cpu", torch.float64)
        g, s = self.gates, self.state
        s[:g] += ran.sum(dim=1)
        s[g] += ran.shape[1]
        counts = ran.sum(dim=0).long()
        s[g + 1 : 2 * g + 2] += torch.bincount(counts, minlength=g + 1).double()
        macs = self.base_macs + self._macs @ ran
        s[2 * g + 2] += macs.sum()
        span = max(self.max_macs - self.base_macs, 1)
        index = ((macs - self.base_macs) / span * self.bins).long().clamp(0, self.bins - 1)
        s[2 * g + 3 :] += torch.bincount(index, minlength=self.bins).double()

    def summary(self) -> dict[str, Any]:
        """JSON-able summary: rates per gate, mean executed blocks, mean MACs per image, both histograms."""
        g, s = self.gates, self.state
        images = float(s[g])
        n = max(images, 1.0)
        mean_macs = float(s[2 * g + 2]) / n
        span = (self.max_macs - self.base_macs) / self.bins
        return {
            "images": int(images),
            "gate_rates": [float(v) / n for v in s[:g]],
            "executed_blocks_mean": float((s[g + 1 : 2 * g + 2] * torch.arange(g + 1)).sum()) / n,
            "executed_blocks_hist": [int(v) for v in s[g + 1 : 2 * g + 2]],
            "gated_blocks": g,
            "macs_per_image_mean": mean_macs,
            "macs_all_open": self.max_macs,
            "macs_all_shut": self.base_macs,
            "macs_skipped_fraction": 1.0 - mean_macs / self.max_macs if images else math.nan,
            "macs_hist": [int(v) for v in s[2 * g + 3 :]],
            "macs_hist_edges": [self.base_macs + span * i for i in range(self.bins + 1)],
        }
