"""PyramidNet with SkipNet gates (spec training.md §2.6).

Stage 1 is never gated. After every block of stages 2-3 except the last one, a gate looks at that
block's output and decides whether the *next* block runs: 2n - 1 gates (59 for depth 272), so the
first block of stage 2 always runs and the first block of stage 3 can be skipped. A skipped block
outputs its parameter-free shortcut (pool + zero-pad) of the input.

Training: hard gates with a straight-through estimator; every block is computed and blended with
m * F(x) + (1 - m) * shortcut(x). Add the execution penalty of the reference recipe to the loss:

    loss = F.cross_entropy(model(x), y) + 1e-4 * model.gate_penalty()

Eval: each block runs only on the samples whose gate is on (a fully skipped block issues no op at all),
and per-gate execution rates accumulate: `model.gate_rates()`, `model.reset_gate_stats()`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from micronet.models.gates import GateController, GateFeatures, hard_gate
from micronet.models.pyramidnet import PyramidNet, _Bottleneck
from micronet.models.registry import register_family, register_model


@register_family("pyramidskipnet")
class PyramidSkipNet(PyramidNet):
    """`PyramidNet` whose stage-2/3 blocks are gated by a shared LSTM controller."""

    def __init__(self, depth: int = 272, alpha: float = 200.0, final_drop_prob: float = 0.5,
                 gate_features: int = 10, controller_hidden: int = 10, num_classes: int = 100) -> None:
        super().__init__(depth, alpha, final_drop_prob, num_classes)
        blocks = self._gateable_stages()
        # Gate i reads the output of blocks[i] and decides blocks[i + 1]. Gate layers keep PyTorch's default
        # init: He fan-out on a 1x1 conv to 10 channels would saturate the LSTM on un-normalised features.
        self.gates = nn.ModuleList(GateFeatures(block.out_channels, gate_features) for block in blocks[:-1])
        self.controller = GateController(gate_features, controller_hidden)
        # Non-persistent: run statistics, not part of the architecture or of checkpoints.
        self.register_buffer("gate_executed", torch.zeros(self.num_gates, dtype=torch.long), persistent=False)
        self.register_buffer("gate_seen", torch.zeros((), dtype=torch.long), persistent=False)
        self.gate_masks: list[torch.Tensor] = []

    #: forward_features is data-dependent (fx cannot trace it), but these children run in sequence, each output
    #: consumed only by the next: declared so the deploy form still folds the stem BN into the stem conv.
    deploy_segments = (("conv_stem", "bn_stem"),)

    @property
    def num_gates(self) -> int:
        """Number of gates (= number of skippable blocks)."""
        return len(self.gates)

    def _gateable_stages(self) -> list[_Bottleneck]:
        return [*self.layer2, *self.layer3]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stage 1, then the gated stages; stores this forward's gate decisions in `gate_masks`."""
        x = self.layer1(self.bn_stem(self.conv_stem(x)))
        blocks = self._gateable_stages()
        x = blocks[0](x)
        state = None
        masks = []
        for gate, block in zip(self.gates, blocks[1:]):
            p, state = self.controller(gate(x), state)
            mask = hard_gate(p)
            masks.append(mask)
            run_gated = self._gated_block_train if self.training else self._gated_block_eval
            x = run_gated(block, x, mask)
        self.gate_masks = masks
        if not self.training:
            self.gate_executed += (torch.stack(masks) > 0.5).sum(dim=1)
            self.gate_seen += x.shape[0]
        return x

    @staticmethod
    def _gated_block_train(block: _Bottleneck, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # m * (F(x) + s(x)) + (1 - m) * s(x) == s(x) + m * F(x), with the same gradient w.r.t. m.
        residual = block.residual(x)
        return block.shortcut(x) + mask.to(residual.dtype).view(-1, 1, 1, 1) * residual

    @staticmethod
    def _gated_block_eval(block: _Bottleneck, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Data-dependent on purpose: run the block only on the samples whose gate is on, and not at all
        # when none is (an empty-batch conv would still be a dispatched op), so op counters see the saving.
        on = torch.nonzero(mask > 0.5).flatten()
        count = on.numel()
        if count == x.shape[0]:
            return block(x)
        out = block.shortcut(x)
        if count == 0:
            return out
        return out.index_copy(0, on, block(x.index_select(0, on)).to(out.dtype))

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


register_model("pyramidskipnet272_a200", "pyramidskipnet", depth=272, alpha=200.0,
               summary="PyramidNet-272, alpha=200 + SkipNet gates (59, shared LSTM)")
