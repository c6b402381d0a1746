"""Reduction of a (B, T) per-token loss to a scalar: the choice that sets how tokens and sequences weigh."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_ray.algo.masked import masked_mean, masked_sum


def _token_mean(loss_mat: torch.Tensor, mask: torch.Tensor, norm_len: int | None) -> torch.Tensor:
    return masked_mean(loss_mat, mask)


def _seq_mean_token_mean(loss_mat: torch.Tensor, mask: torch.Tensor, norm_len: int | None) -> torch.Tensor:
    # Rows without tokens are left out of the mean rather than counted as 0-loss sequences.
    has_tokens = (mask.to(loss_mat.dtype).sum(-1) > 0).to(loss_mat.dtype)
    return masked_mean(masked_mean(loss_mat, mask, dim=-1), has_tokens)


def _seq_mean_token_sum_norm(loss_mat: torch.Tensor, mask: torch.Tensor, norm_len: int | None) -> torch.Tensor:
    norm = loss_mat.shape[-1] if norm_len is None else norm_len
    return masked_sum(loss_mat, mask, dim=-1).mean() / norm


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, int | None], torch.Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, norm_len: int | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    - "token-mean": sum over all real tokens / their number. Every token weighs the same, so long
      sequences weigh more (DAPO, Yu 2025, sec. 3.3).
    - "seq-mean-token-mean": mean per sequence, then mean over sequences with at least one token
      (the 1/|o_i| of GRPO, Shao 2024 eq. 3). Every sequence weighs the same.
    - "seq-mean-token-sum-norm": sum per sequence / ``norm_len``, mean over all B rows (Dr. GRPO,
      Liu 2025, sec. 3.1): a constant divisor, so no length bias. ``norm_len`` defaults to T; pass the
      generation's max length so the scale does not depend on the batch's padding.

    Micro-batches: "token-mean" of a micro-batch is not the token mean of the whole batch; weigh
    gradient-accumulation steps by token counts if that matters.

    Args:
        loss_mat: (B, T).
        mask: (B, T) 1 on real tokens.
        mode: a key of ``AGGREGATIONS``.
        norm_len: the constant of "seq-mean-token-sum-norm"; ignored by the other modes.
    """
    try:
        fn = AGGREGATIONS[mode]
    except KeyError:
        raise ValueError(f"unknown loss aggregation {mode!r}; allowed: {sorted(AGGREGATIONS)}") from None
    return fn(loss_mat, mask, norm_len)
