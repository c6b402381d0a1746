"""Reward shaping: turn one score per sequence into per-token rewards for the advantage estimators."""

from __future__ import annotations

import torch

from rlhf_ray.algo.kl import kl_penalty
from rlhf_ray.algo.masked import masked_mean, masked_sum
from rlhf_ray.algo.stats import to_floats


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row: (B, T) mask -> (B,) int64, -1 for all-masked rows."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.bool(), positions, -1).amax(-1)


@torch.no_grad()
def shape_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_kind: str = "k1",
    kl_in_reward: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token rewards: the sequence score on the last real token, minus beta * KL on every token.

    r_t = score * [t = last] - beta * KL_t      (Ziegler 2019 eq. 2; Ouyang 2022 eq. 2; Stiennon 2020)

    With ``kl_in_reward=False`` the rewards carry only the score and the KL is meant to enter the loss
    instead (``losses.kl_loss``, as in GRPO, Shao 2024 eq. 3); the KL stats are still reported.
    An all-masked row has no token to hold its score: its rewards are all 0.
    Runs under no_grad: rewards are targets, never differentiated.

    Args:
        scores: (B,) sequence-level reward-model or verifier scores.
        logp: (B, T) log-probs of the response tokens under the rollout policy.
        ref_logp: (B, T) log-probs of the same tokens under the reference policy.
        mask: (B, T) 1 on real response tokens (right-padded).
        kl_coef: beta >= 0, e.g. ``controller.value``.
        kl_kind: estimator name from ``kl.KL_ESTIMATORS``.
        kl_in_reward: subtract beta * KL from the token rewards.

    Returns:
        token_rewards (B, T) (0 on padding), and stats: "kl/mean" (per token), "kl/seq_mean"
        (summed over each sequence, mean over sequences), "kl/coef", "reward/score_mean",
        "reward/seq_mean" (mean over sequences of the summed token rewards).
    """
    w = mask.to(logp.dtype)
    kl = kl_penalty(logp, ref_logp, kl_kind) * w  # (B, T)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    at_last = (positions == last_token_index(mask).unsqueeze(-1)).to(logp.dtype)  # (B, T) one-hot or 0
    token_rewards = at_last * scores.to(logp.dtype).unsqueeze(-1)
    if kl_in_reward:
        token_rewards = token_rewards - kl_coef * kl
    seq_kl = kl.sum(-1)
    stats = {
        "kl/mean": masked_mean(kl, w),
        "kl/seq_mean": seq_kl.mean(),
        "kl/coef": float(kl_coef),
        "reward/score_mean": scores.float().mean(),
        "reward/seq_mean": masked_sum(token_rewards, w, dim=-1).mean(),
    }
    return token_rewards, to_floats(stats)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu 2025, eq. 13), added to the sequence score.

    With L_max = ``max_len`` and L_cache = ``buffer``: 0 for |y| <= L_max - L_cache, a linear ramp
    ((L_max - L_cache) - |y|) / L_cache down to -1 at |y| = L_max, and -1 beyond; scaled by ``factor``.
    A response cut at the generation limit thus loses reward smoothly instead of being truncated noise.

    Args:
        lengths: (B,) response lengths in tokens.
        max_len: L_max, the generation limit (``rollout.max_new_tokens``).
        buffer: L_cache >= 1 tokens of the soft zone; must not exceed ``max_len``.

    Returns:
        (B,) penalties <= 0, float32.
    """
    if not 1 <= buffer <= max_len:
        raise ValueError(f"overlong buffer must be in [1, max_len={max_len}], got {buffer}")
    over = lengths.to(torch.float32) - (max_len - buffer)
    return -factor * (over / buffer).clamp(0.0, 1.0)
