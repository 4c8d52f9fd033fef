"""PyramidNet with SkipNet gates (spec training.md §2.6).

Stage 1 is never gated. After every block of stages 2-3 except the last one, a gate looks at that
block's output and decides whether the *next* block runs: 2n - 1 gates (59 for depth 272), so the
first block of stage 2 always runs and the first block of stage 3 can be skipped. A skipped block
outputs its parameter-free shortcut (pool + zero-pad) of the input.

Training: every block is computed and blended with m * F(x) + (1 - m) * shortcut(x); m comes from
``GatedNetwork.decide`` (hard gates with a straight-through estimator, or Bernoulli samples under
``gate_sampling`` for the hybrid RL stage). The supervised recipe adds the execution penalty:

    loss = F.cross_entropy(model(x), y) + 1e-4 * model.gate_penalty()

Eval: each block runs only on the samples whose gate is on (a fully skipped block issues no op at all),
and per-gate execution rates accumulate: `model.gate_rates()`, `model.reset_gate_stats()`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from micronet.models.gates import GateController, GatedNetwork, GatedPlan, GateFeatures
from micronet.models.pyramidnet import PyramidNet, _Bottleneck
from micronet.models.registry import register_family, register_model


@register_family("pyramidskipnet")
class PyramidSkipNet(GatedNetwork, PyramidNet):
    """`PyramidNet` whose stage-2/3 blocks are gated by a shared LSTM controller."""

    def __init__(self, depth: int = 272, alpha: float = 200.0, final_drop_prob: float = 0.5,
                 gate_features: int = 10, controller_hidden: int = 10, num_classes: int = 100) -> None:
        super().__init__(depth, alpha, final_drop_prob, num_classes)
        blocks = self._gateable_stages()
        # Gate i reads the output of blocks[i] and decides blocks[i + 1]. Gate layers keep PyTorch's default
        # init: He fan-out on a 1x1 conv to 10 channels would saturate the LSTM on un-normalised features.
        self.gates = nn.ModuleList(GateFeatures(block.out_channels, gate_features) for block in blocks[:-1])
        self.controller = GateController(gate_features, controller_hidden)
        self._init_gates(len(self.gates))

    #: forward_features is data-dependent (fx cannot trace it), but these children run in sequence, each output
    #: consumed only by the next: declared so the deploy form still folds the stem BN into the stem conv.
    deploy_segments = (("conv_stem", "bn_stem"),)
    #: forward_features (and the gated plan's stem) hands the image, unchanged, to this child alone: the pixel-input
    #: form (compress/pixel_input.py) rewrites it into the exact pixel-input first layer, the gated blocks stay as
    #: they are.
    input_module = "conv_stem"

    def gated_block_names(self) -> list[str]:
        """Module names of the gated blocks (every stage-2/3 block but the first of stage 2)."""
        names = [f"layer2.{i}" for i in range(len(self.layer2))] + [f"layer3.{i}" for i in range(len(self.layer3))]
        return names[1:]

    def gated_plan(self) -> GatedPlan:
        """Stem and stage 1 plus the first stage-2 block, then one gate per block, then the head."""
        names = self.gated_block_names()

        def whole(path: str):
            # residual + shortcut rather than block(x): the methods run the module tree's own layers in every
            # form (the integer deploy form merges layers in place), exactly as the eval forward computes them.
            return lambda root, x: root.get_submodule(path).residual(x) + root.get_submodule(path).shortcut(x)

        def skip(path: str):
            return lambda root, x: root.get_submodule(path).shortcut(x)

        def feature(index: int):
            return lambda root, x: root.gates[index](x)

        def stem(root: nn.Module, x: torch.Tensor) -> torch.Tensor:
            x = root.bn_stem(root.conv_stem(x))
            for k in range(len(root.layer1)):
                x = whole(f"layer1.{k}")(root, x)
            return whole("layer2.0")(root, x)

        return GatedPlan(stem=stem, features=tuple(feature(i) for i in range(len(names))),
                         blocks=tuple(whole(n) for n in names), skips=tuple(skip(n) for n in names),
                         head=lambda root, x: PyramidNet.forward_head(root, x), block_names=tuple(names))

    def _gateable_stages(self) -> list[_Bottleneck]:
        return [*self.layer2, *self.layer3]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stage 1, then the gated stages; stores this forward's gate decisions in `gate_masks`."""
        x = self.layer1(self.bn_stem(self.conv_stem(x)))
        blocks = self._gateable_stages()
        x = blocks[0](x)
        state = None
        self._begin_gated_forward()
        for gate, block in zip(self.gates, blocks[1:]):
            p, state = self.controller(gate(x), state)
            mask = self.decide(p)
            run_gated = self._gated_block_train if self.training else self._gated_block_eval
            x = run_gated(block, x, mask)
        self._end_gated_forward(x.shape[0])
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


register_model("pyramidskipnet272_a200", "pyramidskipnet", depth=272, alpha=200.0,
               summary="PyramidNet-272, alpha=200 + SkipNet gates (59, shared LSTM)")
