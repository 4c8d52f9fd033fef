"""The hybrid-RL loss of SkipNet (Wang et al., ECCV 2018; spec training.md §2.6): REINFORCE on the gates.

Each image is an episode whose actions are its gate decisions a_1..a_G (1 = run the block). Gate g earns
r_g = (1 - a_g)·α/G for skipping; the episode ends with the reward -CE of the image. Returns are summed
backwards, R_g = r_g + γ·R_{g+1} with R_{G+1} = -CE, and the policy-gradient loss is

    L_RL = Σ over images (or their mean) of Σ_g -log π(a_g)·R_g,     π(a) = p if a = 1 else 1 - p,

added to the (batch-mean) task loss as ``loss = task + rl_weight · L_RL``. Defaults follow the official
SkipNet code (``cifar/train_rl.py``: α = 0.1, rl_weight = 0.01, γ = 1). Its ``action.reinforce(rl_weight·R)``
(PyTorch 0.2 stochastic functions) adds each image's REINFORCE gradient unscaled, i.e. the RL term is
*summed* over the batch next to a mean CE: reduction "sum". The PyramidNet entry (``RL/utils/common_utils.py``
``train_rl``) averages it over the batch instead, reduction "mean", with the same α, weight and γ
(``RL/config.json``): its RL term is batch-size times weaker. Rewards and returns carry no gradient: only
log π does.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def gate_returns(actions: Tensor, final_reward: Tensor, alpha: float, gamma: float = 1.0) -> Tensor:
    """Returns R [G, N] for actions [G, N] in {0, 1} and the per-image final reward [N] (-CE)."""
    num_gates = actions.shape[0]
    rewards = (1.0 - actions) * (alpha / num_gates)
    returns = torch.empty_like(rewards)
    running = final_reward
    for g in range(num_gates - 1, -1, -1):
        running = rewards[g] + gamma * running
        returns[g] = running
    return returns


#: How L_RL combines the images of a batch: "sum" (official SkipNet) or "mean" (the PyramidNet entry).
RL_REDUCTIONS = ("sum", "mean")


def policy_gradient_loss(probs: Tensor, actions: Tensor, task_loss: Tensor, alpha: float,
                         gamma: float = 1.0, eps: float = 1e-8, reduction: Literal["sum", "mean"] = "sum") -> Tensor:
    """L_RL for execution probabilities ``probs`` [G, N], sampled ``actions`` [G, N] and per-image CE [N],
    summed or averaged over the images (``reduction``)."""
    if reduction not in RL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {RL_REDUCTIONS}, got {reduction!r}")
    actions = actions.detach().to(probs.dtype)
    returns = gate_returns(actions, -task_loss.detach().to(probs.dtype), alpha, gamma)
    # log π(a) = a·log p + (1 - a)·log(1 - p); eps keeps a saturated gate finite.
    log_pi = actions * torch.log(probs.clamp_min(eps)) + (1.0 - actions) * torch.log((1.0 - probs).clamp_min(eps))
    per_image = -(log_pi * returns).sum(dim=0)
    return per_image.sum() if reduction == "sum" else per_image.mean()
