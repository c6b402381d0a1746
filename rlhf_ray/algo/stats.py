"""Statistics operators watch during training.

Helpers return detached 0-d tensors so a loss can assemble all of its stats and convert them to python
floats with a single device sync (:func:`to_floats`). Empty masks give 0, never NaN or inf.
"""

from __future__ import annotations

import torch

from rlhf_ray.algo.kl import kl_penalty
from rlhf_ray.algo.masked import masked_mean, masked_var


def to_floats(stats: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Convert a dict of 0-d tensors (and floats) to python floats with one host sync."""
    keys = [k for k, v in stats.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in stats.items() if not isinstance(v, torch.Tensor)}
    if keys:
        values = torch.stack([stats[k].detach().double().reshape(()) for k in keys]).tolist()
        out.update(zip(keys, values))
    return {k: out[k] for k in stats}


@torch.no_grad()
def masked_min(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Minimum of ``x`` (B, T) over real tokens of ``mask`` (B, T); 0-d, 0 if none are real."""
    m = mask.bool()
    return torch.where(m.any(), torch.where(m, x, torch.inf).amin(), 0.0).to(x.dtype)


@torch.no_grad()
def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Maximum of ``x`` (B, T) over real tokens of ``mask`` (B, T); 0-d, 0 if none are real."""
    m = mask.bool()
    return torch.where(m.any(), torch.where(m, x, -torch.inf).amax(), 0.0).to(x.dtype)


@torch.no_grad()
def summary(x: torch.Tensor, mask: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """``{prefix/mean, prefix/std, prefix/min, prefix/max}`` over real tokens, as 0-d tensors.

    Args:
        x: (B, T) e.g. advantages or returns.
        mask: (B, T) 1 on real tokens.
        prefix: namespace, e.g. "adv" or "ret".
    """
    return {
        f"{prefix}/mean": masked_mean(x, mask),
        f"{prefix}/std": masked_var(x, mask).sqrt(),
        f"{prefix}/min": masked_min(x, mask),
        f"{prefix}/max": masked_max(x, mask),
    }


def advantage_stats(advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Summary of advantages ("adv/...") and returns ("ret/...") as python floats. All (B, T)."""
    return to_floats(summary(advantages, mask, "adv") | summary(returns, mask, "ret"))


@torch.no_grad()
def approx_kl(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi_old || pi) per token, masked mean; 0-d.

    The tokens were sampled from pi_old, so pi_old is the first argument of the estimator
    (Schulman 2020, "Approximating KL Divergence"; the ``approxkl`` of OpenAI baselines ppo2 uses k2).

    Args:
        logp: (B, T) log-probs under the current policy.
        old_logp: (B, T) log-probs under the policy that generated the batch.
        mask: (B, T).
    """
    return masked_mean(kl_penalty(old_logp, logp, "k3"), mask)


@torch.no_grad()
def clip_fraction(ratio: torch.Tensor, mask: torch.Tensor, clip_low: float, clip_high: float) -> torch.Tensor:
    """Fraction of real tokens whose ratio lies outside [1 - clip_low, 1 + clip_high]; 0-d.

    Same definition as ``clipfrac`` in OpenAI baselines ppo2, with asymmetric bounds (Yu 2025, DAPO).

    Args:
        ratio: (B, T) pi / pi_old.
        mask: (B, T).
    """
    outside = (ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)
    return masked_mean(outside.to(ratio.dtype), mask)


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over real tokens; 0-d.

    1 is a perfect critic, 0 is no better than a constant, negative is worse than a constant.
    Defined as 0 when the returns have no variance (the ratio is undefined there).

    Args:
        values: (B, T) critic predictions.
        returns: (B, T) critic targets.
        mask: (B, T).
    """
    var_returns = masked_var(returns, mask)
    ev = 1.0 - masked_var(returns - values, mask) / var_returns.clamp_min(1e-12)
    return torch.where(var_returns > 0, ev, torch.zeros_like(ev))
