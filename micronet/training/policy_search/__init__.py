"""Augmentation-policy search on your own data: Fast AutoAugment, AWS AutoAugment and a random baseline.

* ``fastaa``: Fast AutoAugment's density matching (Lim et al., 2019): K stratified splits, one model per
  split trained on D_M with the baseline augmentation, candidate policies scored by the any-of-V top-1 of
  that model on D_A augmented with them; optuna's TPE proposes (``sampler="random"``: random search).
* ``aws``: AWS AutoAugment's augmentation-wise weight sharing (Tian et al., 2020): a shared model trained
  with the uniform distribution over op pairs, then PPO on the pair distribution with fine-tuned copies
  as the reward.

Both write a policy JSON that ``augment.policy`` / ``--set augment.policy=FILE`` accept directly.
"""

from micronet.training.policy_search.aws import AWS_OPS, PairPolicy, ppo_search, search_aws
from micronet.training.policy_search.common import (
    SearchSettings,
    any_of_views_accuracy,
    open_search,
    train_model,
)
from micronet.training.policy_search.fastaa import FASTAA_OPS, search_fastaa
from micronet.training.policy_search.run import search
from micronet.training.policy_search.show import plot_policy, policy_summary

__all__ = [
    "AWS_OPS", "FASTAA_OPS", "PairPolicy", "SearchSettings", "any_of_views_accuracy", "open_search", "plot_policy",
    "policy_summary", "ppo_search", "search", "search_aws", "search_fastaa", "train_model",
]
