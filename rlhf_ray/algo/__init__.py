"""Pure-torch RLHF algorithm core: masking, log-probs, KL, reward shaping, advantages, losses, stats,
and the registry of algorithms that combines them.

Imports only torch, so it is testable and importable anywhere (no ray, vllm, deepspeed, transformers).
Shapes: responses are right-padded, ``mask`` is (B, T) with 1 on real response tokens; sequence-level
tensors are (B,); groups are contiguous runs of ``group_size`` rows per prompt.

Names resolve on first use (PEP 562) from the table below, so ``rlhf_ray.algo.registry`` (no torch)
can be read by the config loader without paying for a torch import; everything else is unchanged:
``from rlhf_ray import algo; algo.gae(...)``.
"""

from __future__ import annotations

import importlib

_HOME = {
    "advantages": ("ADVANTAGE_ESTIMATORS", "compute_advantages", "dr_grpo", "gae", "grpo", "reinforce_pp",
                   "reverse_discounted_cumsum", "rloo"),
    "aggregation": ("AGGREGATIONS", "aggregate"),
    "kl": ("KL_ESTIMATORS", "AdaptiveKLController", "FixedKLController", "kl_penalty"),
    "logprobs": ("entropy_from_logits", "token_logprobs", "token_logprobs_and_entropy"),
    "dpo": ("dpo_loss", "sequence_logprobs"),
    "losses": ("bradley_terry_loss", "entropy_bonus", "kl_loss", "policy_loss", "sft_loss", "value_loss"),
    "masked": ("masked_mean", "masked_sum", "masked_var", "masked_whiten"),
    "objectives": ("OBJECTIVES", "cispo_loss", "gspo_loss", "objective_loss", "sequence_log_ratio"),
    "offpolicy": ("is_correction_weights",),
    "registry": ("ALGORITHMS", "IS_CORRECTIONS", "AlgorithmSpec", "estimator_kwargs", "get_algorithm"),
    "rewards": ("last_token_index", "overlong_penalty", "shape_rewards"),
    "turns": ("has_holes", "pack_policy_tokens", "unpack_policy_tokens"),
    "stats": ("advantage_stats", "approx_kl", "clip_fraction", "explained_variance", "masked_max", "masked_min",
              "summary", "to_floats"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    try:
        module = _MODULE_OF[name]
    except KeyError:
        raise AttributeError(f"module 'rlhf_ray.algo' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"rlhf_ray.algo.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
