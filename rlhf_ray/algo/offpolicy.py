"""Off-policy correction between the generator that sampled a batch and the learner that trains on it.

The generator (vLLM) samples with weights that may lag the learner's (``rollout.sync.max_off_policy_lag``)
and computes log-probs with different kernels. PPO's ratio is taken against the learner's own log-probs
at the start of the update (the proximal policy); the gap to the sampling policy is corrected with a
truncated importance weight per token (Ionides 2008; "Your efficient RL framework secretly brings you
off-policy RL training", Yao et al. 2025, the TIS of verl and TRL):

    w_t = min(pi_prox(a_t) / mu(a_t), C)

Truncation at C bounds the variance a few tokens with a tiny mu could add; it biases towards mu only
where the ratio is above C.
"""

from __future__ import annotations

import torch

from rlhf_ray.algo.masked import masked_mean
from rlhf_ray.algo.stats import masked_max, masked_min, to_floats

# Beyond exp(20) the ratio is truncated at C anyway; clamping keeps exp finite.
_MAX_LOG_RATIO = 20.0


@torch.no_grad()
def truncated_is_weights(
    proximal_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token weights min(pi_prox / mu, cap), 0 on padding, and the ratio's statistics.

    Args:
        proximal_logp: (B, T) log pi_prox(a_t), the learner before this update.
        behaviour_logp: (B, T) log mu(a_t), the generator that sampled a_t.
        mask: (B, T).
        cap: C >= 1.

    Returns:
        weights (B, T) detached; stats "tis/ratio_mean", "tis/ratio_min", "tis/ratio_max" (before
        truncation), "tis/truncated_frac" (tokens whose ratio exceeded C), "tis/weight_mean".
    """
    if not cap >= 1.0:
        raise ValueError(f"the importance-weight cap must be >= 1, got {cap}")
    ratio = torch.exp((proximal_logp - behaviour_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    w = ratio.clamp(max=cap) * mask.to(ratio.dtype)
    stats = {
        "tis/ratio_mean": masked_mean(ratio, mask),
        "tis/ratio_min": masked_min(ratio, mask),
        "tis/ratio_max": masked_max(ratio, mask),
        "tis/truncated_frac": masked_mean((ratio > cap).to(ratio.dtype), mask),
        "tis/weight_mean": masked_mean(w, mask),
    }
    return w, to_floats(stats)
