"""Policy objectives other than PPO's token-level clipped surrogate, and the table that names them all.

    ppo_clip  PPO's clipped surrogate with a token-level ratio (``losses.policy_loss``)
    gspo      GSPO: the clip acts on a sequence-level, length-normalised ratio (Zheng et al. 2025)
    cispo     CISPO: a clipped, stop-gradient IS weight times log pi (MiniMax-M1, Chen et al. 2025)

Every entry takes ``(logp, old_logp, advantages, mask, *, clip_low, clip_high, dual_clip, agg, norm_len,
is_weights)`` on (B, T) tensors and returns ``(loss, stats)``, so the loss glue calls whichever the algorithm
names (``registry.AlgorithmSpec.objective``). ``is_weights`` (B, T) are the train/inference mismatch weights
(``offpolicy.is_correction``), applied to each token's loss as in ``policy_loss``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_ray.algo.aggregation import aggregate
from rlhf_ray.algo.losses import _MAX_LOG_RATIO, policy_loss
from rlhf_ray.algo.masked import masked_mean
from rlhf_ray.algo.stats import approx_kl, clip_fraction, masked_max, masked_min, to_floats


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) log s_i = (1/|y_i|) sum_t (log pi - log pi_old): the log of GSPO's length-normalised ratio
    (Zheng 2025, eq. 7). Rows without tokens get 0 (ratio 1), so they neither clip nor move."""
    m = mask.to(logp.dtype)
    return ((logp - old_logp) * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    dual_clip: float | None = None,
    agg: str = "seq-mean-token-mean",
    norm_len: int | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5-7), in its GSPO-token form (eq. 13).

    s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|) = exp(mean_t log r_t), one ratio per sequence, clipped to
    [1 - clip_low, 1 + clip_high] (the paper's 3e-4 / 4e-4: a length-normalised ratio moves far less than a
    token's). The token form s_{i,t} = sg(s_i) pi(y_{i,t}) / sg(pi(y_{i,t})) has the value s_i and, with an
    advantage constant over the sequence, the gradient of eq. 5; with "seq-mean-token-mean" the loss is
    1/G sum_i max(-A_i s_i, -A_i clip(s_i)).

    Args:
        logp: (B, T) log pi of the sampled tokens, with grad.
        old_logp: (B, T) log pi_old (detached here).
        advantages: (B, T) A_{i,t}, constant along a sequence for GRPO's estimator (detached here).
        mask: (B, T).
        dual_clip: must be None (a token-level PPO device; GSPO has no such term).
        agg, norm_len: see :func:`aggregation.aggregate`.
        is_weights: (B, T) or None.

    Returns:
        loss (0-d), stats: "policy/loss", "policy/clip_frac" (sequences whose ratio was clipped),
        "policy/approx_kl", "policy/ratio_min", "policy/ratio_max", "policy/ratio_mean" (sequence ratios s_i).
    """
    if dual_clip is not None:
        raise ValueError("gspo_loss has no dual clip: algorithm.dual_clip applies to the token-level PPO surrogate")
    old_logp, advantages = old_logp.detach(), advantages.detach()
    log_s = sequence_log_ratio(logp, old_logp, mask).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # (B,)
    s_tok = torch.exp(logp - logp.detach() + log_s.detach()[:, None])                        # (B, T) value s_i
    neg_adv = -advantages
    loss_mat = torch.maximum(neg_adv * s_tok, neg_adv * s_tok.clamp(1.0 - clip_low, 1.0 + clip_high))
    if is_weights is not None:
        loss_mat = loss_mat * is_weights.detach()
    loss = aggregate(loss_mat, mask, agg, norm_len)

    with torch.no_grad():
        s = log_s.detach().exp()                                         # (B,)
        rows = (mask.sum(-1) > 0).to(s.dtype)                            # (B,) sequences with tokens
        clipped = ((s < 1.0 - clip_low) | (s > 1.0 + clip_high)).to(s.dtype)
        stats = {
            "policy/loss": loss.detach(),
            "policy/clip_frac": masked_mean(clipped, rows),
            "policy/approx_kl": approx_kl(logp.detach(), old_logp, mask),
            "policy/ratio_min": masked_min(s, rows),
            "policy/ratio_max": masked_max(s, rows),
            "policy/ratio_mean": masked_mean(s, rows),
        }
    return loss, to_floats(stats)


def cispo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 1.0,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    norm_len: int | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO (MiniMax-M1, Chen et al. 2025, eq. 4-5): L_t = -sg(clip(r_t, 1 - clip_low, 1 + clip_high)) A_t log pi(a_t).

    PPO's clip zeroes the gradient of a token whose ratio left the range, and the rare "fork" tokens
    (However, Wait, Recheck) are the ones that leave it first; CISPO clips the importance weight instead
    and keeps every token's gradient. With clip_low = 1 the weight has no lower bound (the paper's choice).
    The paper sums over all tokens of the batch and divides by their number: "token-mean".

    Args:
        logp: (B, T) log pi of the sampled tokens, with grad.
        old_logp: (B, T) log pi_old (detached here).
        advantages: (B, T) (detached here).
        mask: (B, T).
        dual_clip: must be None.
        agg, norm_len: see :func:`aggregation.aggregate`.
        is_weights: (B, T) or None.

    Returns:
        loss (0-d), stats: "policy/loss", "policy/clip_frac" (tokens whose weight was clipped),
        "policy/approx_kl", "policy/ratio_min", "policy/ratio_max", "policy/ratio_mean" (token ratios r_t).
    """
    if dual_clip is not None:
        raise ValueError("cispo_loss has no dual clip: algorithm.dual_clip applies to the token-level PPO surrogate")
    old_logp, advantages = old_logp.detach(), advantages.detach()
    with torch.no_grad():
        ratio = torch.exp((logp.detach() - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))  # (B, T)
        weight = ratio.clamp(max(0.0, 1.0 - clip_low), 1.0 + clip_high)
    loss_mat = -weight * advantages * logp
    if is_weights is not None:
        loss_mat = loss_mat * is_weights.detach()
    loss = aggregate(loss_mat, mask, agg, norm_len)

    with torch.no_grad():
        stats = {
            "policy/loss": loss.detach(),
            "policy/clip_frac": clip_fraction(ratio, mask, min(clip_low, 1.0), clip_high),
            "policy/approx_kl": approx_kl(logp.detach(), old_logp, mask),
            "policy/ratio_min": masked_min(ratio, mask),
            "policy/ratio_max": masked_max(ratio, mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
        }
    return loss, to_floats(stats)


OBJECTIVES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, float]]]] = {
    "ppo_clip": policy_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
}


def objective_loss(name: str, *args, **kwargs) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective registered as ``name`` applied to the arguments; an unknown name lists the known ones."""
    try:
        fn = OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown policy objective {name!r}; allowed: {sorted(OBJECTIVES)}") from None
    return fn(*args, **kwargs)
