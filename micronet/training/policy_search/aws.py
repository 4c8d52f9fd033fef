"""AWS AutoAugment (Tian et al., NeurIPS 2020): augmentation-wise weight sharing + PPO on op pairs.

A shared model is trained with the uniform distribution over the 36×36 op pairs. Each search loop then
samples ``episodes`` pairs from the policy π(op1, op2) = p(op1)·p(op2 | op1), fine-tunes a copy of the
shared model with each pair (plus the baseline transforms) and takes as reward the mean of its best two
validation accuracies over the fine-tuning epochs. Advantages are measured against a baseline that starts
at the reward of fine-tuning with the uniform distribution and then moves (exponential average of the
loops' mean rewards). The policy takes clipped-PPO steps (Adam) until ``ppo_epochs`` or until
KL(π_old || π) exceeds ``max_kl``. The output is the learned distribution as a weighted policy.

The 36 ops: the 11 ops with a magnitude at three strengths (the official search space's thirds of each
range; enhance ops strengthen away from 1, Color desaturates) plus AutoContrast, Equalize and Invert,
written in Fast-AA levels so the ordinary augmenter applies them (probability 1: the pair is the action).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from micronet.data import ImageSet, Normalization, stratified_splits
from micronet.errors import MicronetError
from micronet.training.batches import derive_seed
from micronet.training.loop import Runtime, restore_state, resume_state
from micronet.training.policy_search.common import (
    SearchSettings,
    any_of_views_accuracy,
    append_log,
    baseline_augmentation,
    load_model,
    make_policy,
    save_model,
    train_model,
    with_policy,
    write_policy,
)


def _thirds(name: str, levels: tuple[float, float, float]) -> list[tuple[str, float]]:
    return [(name, level) for level in levels]


_STRONG = (2 / 3, 5 / 6, 1.0)  # signed ops: |shear| 0.1/0.2/0.3, |translate| 0.15/0.3/0.45 of the size, 10/20/30°
AWS_OPS: tuple[tuple[str, float], ...] = tuple(
    _thirds("ShearX", _STRONG) + _thirds("ShearY", _STRONG) + _thirds("TranslateX", _STRONG)
    + _thirds("TranslateY", _STRONG) + _thirds("Rotate", _STRONG)
    + _thirds("Color", (0.2 / 1.8, 0.5 / 1.8, 0.8 / 1.8))  # factor 0.3, 0.6, 0.9
    + _thirds("Solarize", (26 / 256, 102 / 256, 179 / 256))  # threshold 26, 102, 179
    + _thirds("Posterize", (0.0, 0.25, 0.5))  # keep 4, 5, 6 bits
    + _thirds("Contrast", _STRONG) + _thirds("Sharpness", _STRONG) + _thirds("Brightness", _STRONG)  # 1.3/1.6/1.9
    + [("AutoContrast", 0.0), ("Equalize", 0.0), ("Invert", 0.0)]
)
N_OPS = len(AWS_OPS)  # 36
STATE_FILE = "aws_state.safetensors"


def pair_subpolicy(action: int) -> list[list]:
    """The sub-policy of pair ``action`` (op1 = action // 36, op2 = action % 36), both ops always applied."""
    (a, la), (b, lb) = AWS_OPS[action // N_OPS], AWS_OPS[action % N_OPS]
    return [[a, 1.0, la], [b, 1.0, lb]]


class PairPolicy:
    """π(op1, op2) = softmax(θ1)[op1] · softmax(θ2[op1])[op2]; all zeros = uniform over the 1296 pairs."""

    def __init__(self) -> None:
        self.theta1 = torch.zeros(N_OPS, dtype=torch.float64, requires_grad=True)
        self.theta2 = torch.zeros(N_OPS, N_OPS, dtype=torch.float64, requires_grad=True)

    def parameters(self) -> list[Tensor]:
        """The policy's two logit tensors."""
        return [self.theta1, self.theta2]

    def log_probs(self) -> Tensor:
        """log π of every pair, flattened as ``op1 * 36 + op2``."""
        return (self.theta1.log_softmax(0)[:, None] + self.theta2.log_softmax(1)).flatten()

    def probs(self) -> Tensor:
        """π of every pair (detached)."""
        return self.log_probs().detach().exp()


RewardFn = Callable[[int | None, int, int], float]  # (pair or None for uniform, loop, episode) -> reward


def _save_state(path: Path, policy: PairPolicy, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    tensors, opt_meta = resume_state(optimizer)
    tensors = {**tensors, "theta1": policy.theta1.detach(), "theta2": policy.theta2.detach()}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"meta": json.dumps(meta), "optimizer": json.dumps(opt_meta)})
    os.replace(tmp, path)


def ppo_search(reward_fn: RewardFn, settings: SearchSettings, out: Path, *, progress: bool = False
               ) -> tuple[PairPolicy, dict[str, Any]]:
    """Run (or continue from ``out``) the PPO loops on the pair distribution; returns (policy, state meta)."""
    from tqdm.auto import tqdm

    policy = PairPolicy()
    optimizer = torch.optim.Adam(policy.parameters(), lr=settings.ppo_lr)
    out.mkdir(parents=True, exist_ok=True)
    state_path, log = out / STATE_FILE, out / "loops.jsonl"
    if state_path.is_file():
        tensors = load_file(str(state_path))
        with safe_open(str(state_path), "pt") as f:
            header = f.metadata()
        meta = json.loads(header["meta"])
        with torch.no_grad():
            policy.theta1.copy_(tensors.pop("theta1"))
            policy.theta2.copy_(tensors.pop("theta2"))
        restore_state(optimizer, tensors, json.loads(header["optimizer"]), torch.device("cpu"))
    else:
        initial = float(reward_fn(None, -1, 0))  # the uniform distribution's reward: the initial baseline
        meta = {"loop": 0, "baseline": initial, "initial_baseline": initial, "rewards": []}
        _save_state(state_path, policy, optimizer, meta)
    bar = tqdm(total=settings.loops, initial=meta["loop"], desc="aws loops", disable=not progress, leave=False)
    while meta["loop"] < settings.loops:
        loop = meta["loop"]
        with torch.no_grad():
            logp_old = policy.log_probs()
        p_old = logp_old.exp()
        g = torch.Generator().manual_seed(derive_seed(settings.seed, 7, loop))
        actions = torch.multinomial(p_old, settings.episodes, replacement=True, generator=g)
        rewards = torch.tensor([float(reward_fn(int(a), loop, e)) for e, a in enumerate(actions.tolist())],
                               dtype=torch.float64)
        advantage = rewards - meta["baseline"]
        steps, kl = 0, 0.0
        for _ in range(settings.ppo_epochs):
            logp = policy.log_probs()
            ratio = (logp[actions] - logp_old[actions]).exp()
            surrogate = torch.minimum(ratio * advantage,
                                      ratio.clamp(1 - settings.clip, 1 + settings.clip) * advantage).mean()
            entropy = -(logp.exp() * logp).sum()
            loss = -surrogate - settings.entropy_weight * entropy
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            with torch.no_grad():
                kl = float((p_old * (logp_old - policy.log_probs())).sum())
            if kl > settings.max_kl:  # the step that crossed the bound is kept; no further steps this loop
                break
        mean_reward = float(rewards.mean())
        meta["baseline"] = settings.baseline_decay * meta["baseline"] + (1 - settings.baseline_decay) * mean_reward
        meta["rewards"].append(mean_reward)
        meta["loop"] = loop + 1
        _save_state(state_path, policy, optimizer, meta)
        append_log(log, {"loop": loop, "actions": actions.tolist(), "rewards": rewards.tolist(), "ppo_steps": steps,
                         "kl": kl, "baseline": meta["baseline"]})
        bar.update(1)
    bar.close()
    return policy, meta


def search_aws(data: ImageSet, settings: SearchSettings, out: Path, rt: Runtime, normalize: Normalization, *,
               searched_on: str, progress: bool = True, split: tuple[Tensor, Tensor] | None = None) -> Path:
    """Run (or continue) an AWS AutoAugment search in ``out``; returns the written ``out/policy.json``."""
    (train_idx, val_idx), = [split] if split is not None else stratified_splits(data.labels, 1, settings.holdout,
                                                                                 settings.seed)
    train, val = data.subset(train_idx), data.subset(val_idx)
    baseline = baseline_augmentation(settings)
    uniform = make_policy([pair_subpolicy(a) for a in range(N_OPS * N_OPS)], "uniform-pairs")
    shared_path = out / "shared" / "model.safetensors"
    if shared_path.is_file():
        shared = load_model(shared_path, rt)
    else:
        shared = train_model(settings.model, train, settings, rt, normalize, with_policy(uniform, baseline),
                             derive_seed(settings.seed, 5), progress=progress, describe="shared model")
        save_model(shared_path, shared, {"settings": settings.to_dict()})

    def reward(action: int | None, loop: int, episode: int) -> float:
        pol = uniform if action is None else make_policy([pair_subpolicy(action)], "pair")
        accuracies: list[float] = []

        def score(model) -> None:
            accuracies.append(any_of_views_accuracy(model, val, None, 1, 0, normalize, rt, settings.eval_batch_size))

        train_model(copy.deepcopy(shared), train, settings, rt, normalize, with_policy(pol, baseline),
                    derive_seed(settings.seed, 11, loop, episode), epochs=settings.finetune_epochs,
                    lr=settings.finetune_lr, on_epoch=score)
        best = sorted(accuracies)[-2:]
        return sum(best) / len(best)

    policy, meta = ppo_search(reward, settings, out, progress=progress)
    probs = policy.probs()
    order = torch.argsort(probs, descending=True, stable=True).tolist()
    if settings.keep:
        order = order[: settings.keep]
    if not order:
        raise MicronetError("nothing to write: --keep selected no pairs")
    metadata = {"method": "aws", "dataset": searched_on, "model": settings.model, "seed": settings.seed,
                "budget": settings.to_dict(), "initial_baseline": meta["initial_baseline"],
                "loop_rewards": meta["rewards"]}
    return write_policy(out / "policy.json", [pair_subpolicy(a) for a in order], name=f"aws-{searched_on}",
                        searched_on=searched_on, metadata=metadata, weights=[float(probs[a]) for a in order])
