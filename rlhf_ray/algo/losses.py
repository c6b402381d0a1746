"""Training losses. Each returns ``(loss, stats)``: a differentiable 0-d tensor and python floats.

Token-level losses build a (B, T) loss matrix and reduce it with :func:`aggregate` (``agg=`` one of
``aggregation.AGGREGATIONS``), so every token-level loss can use any aggregation mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_ray.algo.aggregation import aggregate
from rlhf_ray.algo.kl import kl_penalty
from rlhf_ray.algo.logprobs import token_logprobs
from rlhf_ray.algo.masked import masked_mean
from rlhf_ray.algo.stats import approx_kl, clip_fraction, explained_variance, masked_max, masked_min, to_floats

# log pi - log pi_old beyond +-20 means ratios of 5e8; clamping keeps exp finite, the clip does the rest.
_MAX_LOG_RATIO = 20.0


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    norm_len: int | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman 2017, eq. 7), as a loss to minimise.

    L_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high)),  r_t = pi(a_t) / pi_old(a_t).
    Separate ``clip_low``/``clip_high`` allow DAPO's clip-higher (Yu 2025). With ``dual_clip`` = c > 1,
    tokens with A_t < 0 are further capped at -c A_t so a huge ratio cannot blow up the loss
    (Ye 2020, "Mastering Complex Control in MOBA Games", eq. 5).

    Args:
        logp: (B, T) log pi of the taken tokens, with grad.
        old_logp: (B, T) log pi_old from the rollout (detached here).
        advantages: (B, T) (detached here).
        mask: (B, T).
        agg, norm_len: see :func:`aggregate`.
        is_weights: (B, T) per-token importance weights for samples drawn from another policy than
            ``old_logp``'s (``offpolicy.is_correction_weights``); they scale each token's loss.

    Returns:
        loss (0-d), stats: "policy/loss", "policy/clip_frac", "policy/approx_kl", "policy/ratio_min",
        "policy/ratio_max", "policy/ratio_mean", and "policy/dual_clip_frac" when dual_clip is set.
    """
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (Ye 2020), got {dual_clip}")
    old_logp, advantages = old_logp.detach(), advantages.detach()
    neg_adv = -advantages
    ratio = torch.exp((logp - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))  # (B, T)
    unclipped = neg_adv * ratio
    clipped = neg_adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        capped = torch.minimum(loss_mat, neg_adv * dual_clip)
        dual_active = (advantages < 0) & (loss_mat > capped)
        loss_mat = torch.where(advantages < 0, capped, loss_mat)
    if is_weights is not None:
        loss_mat = loss_mat * is_weights.detach()
    loss = aggregate(loss_mat, mask, agg, norm_len)

    with torch.no_grad():
        ratio = ratio.detach()
        stats = {
            "policy/loss": loss.detach(),
            "policy/clip_frac": clip_fraction(ratio, mask, clip_low, clip_high),
            "policy/approx_kl": approx_kl(logp.detach(), old_logp, mask),
            "policy/ratio_min": masked_min(ratio, mask),
            "policy/ratio_max": masked_max(ratio, mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
        }
        if dual_clip is not None:
            stats["policy/dual_clip_frac"] = masked_mean(dual_active.to(ratio.dtype), mask)
    return loss, to_floats(stats)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    norm_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (OpenAI baselines ppo2; Schulman 2017 sec. 5 uses the unclipped square).

    L_t = 0.5 max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -c, c) - R_t)^2); ``clip=None`` gives
    0.5 (V_t - R_t)^2. The clip keeps the critic within c of its rollout-time prediction per update.

    Args:
        values: (B, T) current critic predictions, with grad.
        old_values: (B, T) predictions at rollout time.
        returns: (B, T) targets, e.g. from ``gae``.
        mask: (B, T).

    Returns:
        loss (0-d), stats: "value/loss", "value/clip_frac", "value/explained_var", "value/mean".
    """
    old_values, returns = old_values.detach(), returns.detach()
    squared = (values - returns).square()
    if clip is None:
        loss_mat = squared
        clipped_active = torch.zeros_like(squared, dtype=torch.bool)
    else:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        squared_clipped = (v_clipped - returns).square()
        loss_mat = torch.maximum(squared, squared_clipped)
        clipped_active = squared_clipped > squared
    loss = 0.5 * aggregate(loss_mat, mask, agg, norm_len)
    with torch.no_grad():
        stats = {
            "value/loss": loss.detach(),
            "value/clip_frac": masked_mean(clipped_active.to(values.dtype), mask),
            "value/explained_var": explained_variance(values.detach(), returns, mask),
            "value/mean": masked_mean(values.detach(), mask),
        }
    return loss, to_floats(stats)


def entropy_bonus(
    entropy: torch.Tensor, mask: torch.Tensor, *, coef: float, agg: str = "token-mean", norm_len: int | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Entropy bonus as a loss term: -coef * aggregate(H) (Schulman 2017, eq. 9's c2 S[pi]).

    Args:
        entropy: (B, T) e.g. from ``entropy_from_logits``, with grad.
        mask: (B, T).
        coef: c2 >= 0; 0 gives a zero loss and still reports the entropy.

    Returns:
        loss (0-d), stats: "policy/entropy" (aggregated entropy, nats).
    """
    mean_entropy = aggregate(entropy, mask, agg, norm_len)
    return -coef * mean_entropy, to_floats({"policy/entropy": mean_entropy.detach()})


def kl_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    coef: float,
    kind: str = "k3",
    agg: str = "token-mean",
    norm_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL to the reference policy as a loss term, coef * aggregate(KL_t) (GRPO, Shao 2024, eq. 3-4, k3).

    The alternative to the KL in the reward (``shape_rewards(..., kl_in_reward=False)``); use one, not
    both. What matters here is the estimator's gradient at tokens sampled from pi: k2's,
    (log pi - log ref) grad log pi, is an unbiased estimate of grad KL(pi || ref); k3 (GRPO's choice) is
    biased but low-variance. k1 is refused: its gradient grad log pi has expectation 0 under pi
    (score-function identity), so as a loss it would silently regularise nothing.

    Args:
        logp: (B, T) log pi, with grad.
        ref_logp: (B, T) log pi_ref.
        mask: (B, T).
        coef: beta.
        kind: a key of ``kl.KL_ESTIMATORS`` other than "k1".

    Returns:
        loss (0-d), stats: "kl/loss" (the unscaled aggregated KL).
    """
    if kind == "k1":
        raise ValueError(
            "kl_loss with kind='k1' has zero expected gradient (E_pi[grad log pi] = 0); use 'k2' or 'k3', "
            "or put the k1 penalty in the reward (shape_rewards kl_in_reward=True)"
        )
    kl = aggregate(kl_penalty(logp, ref_logp.detach(), kind), mask, agg, norm_len)
    return coef * kl, to_floats({"kl/loss": kl.detach()})


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Pairwise reward-model loss: -log sigmoid(s_chosen - s_rejected - m), mean over pairs.

    Bradley & Terry 1952; Ouyang 2022, eq. 1. The optional margin m (per pair or constant) asks for a
    larger gap on pairs labelled as clearly better (Touvron 2023, Llama 2, eq. 2).

    Args:
        chosen_scores: (B,) reward-model scores of the preferred responses.
        rejected_scores: (B,) scores of the other responses.
        margin: (B,) or a float, or None.

    Returns:
        loss (0-d), stats: "rm/loss", "rm/accuracy" (fraction with s_chosen > s_rejected),
        "rm/margin" (mean s_chosen - s_rejected), "rm/chosen_mean", "rm/rejected_mean".
    """
    diff = chosen_scores - rejected_scores  # (B,)
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        stats = {
            "rm/loss": loss.detach(),
            "rm/accuracy": (diff > 0).float().mean(),
            "rm/margin": diff.mean(),
            "rm/chosen_mean": chosen_scores.mean(),
            "rm/rejected_mean": rejected_scores.mean(),
        }
    return loss, to_floats(stats)


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, *, agg: str = "token-mean"
) -> tuple[torch.Tensor, dict[str, float]]:
    """Negative log-likelihood of the response tokens only (Ouyang 2022, sec. 3.5 SFT).

    No shift inside: ``logits[:, t]`` scores ``labels[:, t]``. For a causal LM pass ``logits[:, :-1]``
    with ``input_ids[:, 1:]`` and the mask shifted the same way. Labels at masked positions are never
    read, so they may hold -100 or any other placeholder.

    Args:
        logits: (B, T, V).
        labels: (B, T) token ids.
        loss_mask: (B, T) 1 on response tokens, 0 on prompt and padding.

    Returns:
        loss (0-d), stats: "sft/loss", "sft/tokens" (number of supervised tokens).
    """
    safe_labels = torch.where(loss_mask.bool(), labels, 0)
    nll = -token_logprobs(logits, safe_labels)  # (B, T)
    loss = aggregate(nll, loss_mask, agg)
    return loss, to_floats({"sft/loss": loss.detach(), "sft/tokens": loss_mask.float().sum()})
