"""Masked reductions over right-padded response tensors.

Convention for every function here: ``mask`` is (B, T) bool or float, 1 on real response tokens and 0 on
padding. Padded entries of ``x`` must be finite (``0 * inf`` is NaN). A reduction over zero real tokens
returns 0, never NaN: all-masked rows appear in practice (padding rows added to even out a dispatch).
"""

from __future__ import annotations

import torch

# Floor for denominators that count tokens; any real count is >= 1, so this only matters for empty masks.
_TINY = 1e-12


def _weights(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(like.dtype)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over real tokens.

    Args:
        x: (B, T) values.
        mask: (B, T) 1 on real tokens.
        dim: reduce over this dim only (e.g. ``-1`` gives per-sequence sums (B,)); ``None`` gives a scalar.
    """
    prod = x * _weights(mask, x)
    return prod.sum() if dim is None else prod.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over real tokens; 0 where there are none.

    Args:
        x: (B, T) values.
        mask: (B, T) 1 on real tokens.
        dim: ``None`` gives the global token mean (scalar); ``-1`` gives per-sequence means (B,).
    """
    w = _weights(mask, x)
    num = (x * w).sum() if dim is None else (x * w).sum(dim)
    den = w.sum() if dim is None else w.sum(dim)
    return num / den.clamp_min(_TINY)


def _moments(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, x - mean, sum of squared deviations over real tokens, number of real tokens)."""
    mean = masked_mean(x, w)
    centered = x - mean
    return mean, centered, (centered.square() * w).sum(), w.sum()


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all real tokens (a scalar); 0 when fewer than two tokens are real.

    Args:
        x: (B, T) values.
        mask: (B, T) 1 on real tokens.
        unbiased: apply Bessel's correction, dividing by n - 1 (n = number of real tokens) instead of n.
    """
    _, _, sq_sum, n = _moments(x, _weights(mask, x))
    # For n <= 1 the sum is exactly 0, so the floor of 1 (and _TINY) keeps the defined result 0.
    return sq_sum / ((n - 1).clamp_min(1.0) if unbiased else n.clamp_min(_TINY))


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over real tokens; padded entries become 0.

    Statistics are global over the batch (all real tokens), as in PPO advantage normalisation
    (OpenAI baselines ppo2; Ouyang 2022) and REINFORCE++ (Hu 2025, sec. 3). The variance is unbiased.

    Args:
        x: (B, T) values.
        mask: (B, T) 1 on real tokens.
        shift_mean: if False, only scale: the mean is added back (keeps the sign of the mean signal).
        eps: added to the variance so constant inputs map to 0 instead of NaN.

    Returns:
        (B, T) whitened values, 0 on padding.
    """
    w = _weights(mask, x)
    mean, centered, sq_sum, n = _moments(x, w)
    out = centered * torch.rsqrt(sq_sum / (n - 1).clamp_min(1.0) + eps)
    if not shift_mean:
        out = out + mean
    return out * w
