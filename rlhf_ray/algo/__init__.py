"""Pure-torch RLHF algorithm core: masking, log-probs, KL, reward shaping, advantages, losses, stats.

Imports only torch, so it is testable and importable anywhere (no ray, vllm, deepspeed, transformers).
Shapes: responses are right-padded, ``mask`` is (B, T) with 1 on real response tokens; sequence-level
tensors are (B,); groups are contiguous runs of ``group_size`` rows per prompt.
"""

from rlhf_ray.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    dr_grpo,
    gae,
    grpo,
    reinforce_pp,
    reverse_discounted_cumsum,
    rloo,
)
from rlhf_ray.algo.aggregate import AGGREGATIONS, aggregate
from rlhf_ray.algo.dpo import dpo_loss, sequence_logprobs
from rlhf_ray.algo.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_penalty
from rlhf_ray.algo.logprobs import entropy_from_logits, token_logprobs
from rlhf_ray.algo.losses import (
    bradley_terry_loss,
    entropy_bonus,
    kl_loss,
    policy_loss,
    sft_loss,
    value_loss,
)
from rlhf_ray.algo.masked import masked_mean, masked_sum, masked_var, masked_whiten
from rlhf_ray.algo.rewards import last_token_index, shape_rewards
from rlhf_ray.algo.stats import (
    advantage_stats,
    approx_kl,
    clip_fraction,
    explained_variance,
    masked_max,
    masked_min,
    summary,
    to_floats,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "advantage_stats",
    "aggregate",
    "approx_kl",
    "bradley_terry_loss",
    "clip_fraction",
    "compute_advantages",
    "dpo_loss",
    "dr_grpo",
    "sequence_logprobs",
    "entropy_bonus",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "grpo",
    "kl_loss",
    "kl_penalty",
    "last_token_index",
    "masked_max",
    "masked_mean",
    "masked_min",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "reinforce_pp",
    "reverse_discounted_cumsum",
    "rloo",
    "sft_loss",
    "shape_rewards",
    "summary",
    "to_floats",
    "token_logprobs",
    "value_loss",
]
