"""Advantage estimators, chosen by name from ``ADVANTAGE_ESTIMATORS``.

Every estimator has the signature
    fn(token_rewards (B, T), mask (B, T), *, values=None, group_size=1, gamma=1.0, lam=1.0, **own_opts)
        -> (advantages (B, T), returns (B, T))
with 0 on padding. Critic-free estimators (grpo, dr_grpo, rloo, reinforce_pp) return ``returns`` equal
to ``advantages``; they accept and ignore the arguments they do not use, so a caller can pass the same
arguments to any of them. Options specific to one estimator are explicit keywords, so a misspelt option
is a TypeError rather than silently ignored.

Groups: B = P * n rows, rows [i*n:(i+1)*n] are the n samples of prompt i. The group estimators use the
sequence return R = sum_t r_t (so a KL penalty placed in the reward counts) broadcast over the tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rlhf_ray.algo.masked import masked_sum, masked_whiten
from rlhf_ray.algo.turns import has_holes, pack_policy_tokens, unpack_policy_tokens

# Block length of the scan in reverse_discounted_cumsum: the matmul costs O(L) per element, the recursion
# O(log_L T) levels; 32 was fastest on CPU for T from 128 to 8192 (benchmarks/algo_bench.py).
_SCAN_BLOCK = 32


def reverse_discounted_cumsum(x: torch.Tensor, discount: float, block: int = _SCAN_BLOCK) -> torch.Tensor:
    """y_t = sum_{k >= t} discount^(k - t) x_k along the last dim, exactly and without a loop over time.

    The time axis is cut into blocks of length L. Within a block the sum is a product with the (L, L)
    upper-triangular matrix of discount powers; the value at each block start then carries into the
    previous block, and those carries are themselves a reverse discounted cumsum (discount^L) over the
    blocks, computed by recursion. Powers never exceed L, so nothing under- or overflows the way the
    ``discount^-t`` rescaling trick does, and discount = 0 is exact.

    Args:
        x: (..., T).
        discount: in [0, 1] for RL, any finite value works.
        block: L >= 2 (each recursion level divides the length by L).

    Returns:
        (..., T), same dtype as ``x``.
    """
    if block < 2:
        raise ValueError(f"block must be >= 2, got {block}")
    lead, t_len = x.shape[:-1], x.shape[-1]
    if t_len == 0:
        return x.clone()
    length = min(block, t_len)
    pad = (-t_len) % length
    flat = x.reshape(-1, t_len)
    if pad:
        flat = F.pad(flat, (0, pad))  # zeros at the end contribute nothing
    n_blocks = flat.shape[-1] // length
    xb = flat.reshape(-1, n_blocks, length)

    base = torch.tensor(discount, dtype=torch.float64, device=x.device)
    idx = torch.arange(length, device=x.device)
    lag = idx.unsqueeze(1) - idx.unsqueeze(0)  # [k, t] = k - t
    tri = torch.where(lag >= 0, base.pow(lag.clamp_min(0)), 0.0).to(x.dtype)  # (L, L)
    out = xb @ tri  # (N, n_blocks, L): sums within each block

    if n_blocks > 1:
        starts = reverse_discounted_cumsum(out[..., 0], discount**length, block)  # (N, n_blocks)
        carry = F.pad(starts[:, 1:], (0, 1))  # value at the start of the next block, 0 after the last
        decay = base.pow(length - idx).to(x.dtype)  # (L,) discount^(L - t)
        out.addcmul_(carry.unsqueeze(-1), decay)
    out = out.reshape(-1, n_blocks * length)
    return (out[:, :t_len] if pad else out).reshape(*lead, t_len)


def _check_right_padded(mask: torch.Tensor) -> None:
    # The scans treat the first padded position as the end of the episode; a hole in the mask would
    # silently bridge two segments.
    m = mask.to(torch.float32) if mask.dtype == torch.bool else mask
    if (m[:, 1:] > m[:, :-1]).any():
        raise ValueError("mask must be right-padded: a real token follows a padded one in some row")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def gae(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman 2016, eq. 16) with returns for the critic.

    delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 after the last real token (the response ended);
    A_t = sum_l (gamma lam)^l delta_{t+l};  returns R_t = A_t + V_t (the TD(lambda) target).
    ``whiten=True`` normalises the advantages over the batch (OpenAI baselines ppo2; Ouyang 2022); off by
    default so the caller's whitening step is the only one. The returns always use the raw advantages.
    ``group_size`` is ignored.

    Args:
        token_rewards: (B, T) e.g. from ``shape_rewards``.
        mask: (B, T) right-padded.
        values: (B, T) critic values V_t of the rollout; required.

    Returns:
        advantages (B, T), returns (B, T); 0 on padding.
    """
    if values is None:
        raise ValueError("gae needs values (B, T) from the critic; critic-free: grpo, rloo, reinforce_pp")
    _check_right_padded(mask)
    dtype = _compute_dtype(token_rewards)
    w = mask.to(dtype)
    # In-place where it stays readable: on CPU each fresh (B, T) temporary costs page faults comparable
    # to the arithmetic (benchmarks/algo_bench.py).
    v = values.detach().to(dtype) * w
    delta = (token_rewards.to(dtype) - v).mul_(w)
    delta[:, :-1].add_(v[:, 1:], alpha=gamma)  # + gamma V_{t+1}; 0 past the last real token as v is masked
    advantages = reverse_discounted_cumsum(delta, gamma * lam)
    returns = v.add_(advantages)  # A_t + V_t
    if whiten:
        advantages = masked_whiten(advantages, w)
    return advantages, returns


def _sequence_returns(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_sum(token_rewards.to(_compute_dtype(token_rewards)), mask, dim=-1)  # (B,)


def _groups(seq_returns: torch.Tensor, group_size: int, name: str, min_size: int = 2) -> torch.Tensor:
    """(B,) -> (P, n), with errors that say what is wrong."""
    if group_size < min_size:
        raise ValueError(
            f"{name} needs group_size >= {min_size} samples per prompt (got {group_size}): "
            "with one sample the group baseline equals the sample's own return"
        )
    batch = seq_returns.shape[0]
    if batch % group_size != 0:
        raise ValueError(f"{name}: batch of {batch} rows is not a whole number of groups of {group_size}")
    return seq_returns.view(batch // group_size, group_size)


def _broadcast(seq_advantages: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    adv = seq_advantages.reshape(-1, 1) * mask.to(seq_advantages.dtype)
    return adv, adv


def grpo(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-normalised advantage (Shao 2024, GRPO, sec. 4.1.2 outcome supervision).

    A_i = (R_i - mean_group(R)) / (std_group(R) + eps), the same for every token of sequence i;
    std is the unbiased sample std. A group of identical returns gets 0 (eps keeps it finite).
    ``values``, ``gamma`` and ``lam`` are ignored.

    Returns:
        advantages (B, T), returns == advantages; 0 on padding.
    """
    r = _groups(_sequence_returns(token_rewards, mask), group_size, "grpo")  # (P, n)
    adv = r - r.mean(-1, keepdim=True)
    if norm_by_std:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    return _broadcast(adv, mask)


def dr_grpo(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO advantage (Liu 2025, "Understanding R1-Zero-Like Training", eq. 3): A_i = R_i - mean_group(R).

    No division by the group std (it up-weights too easy and too hard prompts). The paper's other fix,
    no 1/|o_i| length normalisation, lives in the loss: aggregate with "seq-mean-token-sum-norm".
    ``values``, ``gamma`` and ``lam`` are ignored.

    Returns:
        advantages (B, T), returns == advantages; 0 on padding.
    """
    r = _groups(_sequence_returns(token_rewards, mask), group_size, "dr_grpo")
    return _broadcast(r - r.mean(-1, keepdim=True), mask)


def rloo(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Ahmadian 2024, eq. 6; Kool 2019).

    A_i = R_i - (1 / (n - 1)) sum_{j != i} R_j = n / (n - 1) (R_i - mean_group(R)).
    The baseline excludes the sample itself, so the estimator stays unbiased.
    ``values``, ``gamma`` and ``lam`` are ignored.

    Returns:
        advantages (B, T), returns == advantages; 0 on padding.
    """
    r = _groups(_sequence_returns(token_rewards, mask), group_size, "rloo")
    baseline = (r.sum(-1, keepdim=True) - r) / (group_size - 1)
    return _broadcast(r - baseline, mask)


def reinforce_pp(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 1.0,
    baseline: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, sec. 3): discounted return-to-go, then whitening over the global batch.

    G_t = sum_{k >= t} gamma^(k - t) r_k;  A = (G - mean_batch(G)) / std_batch(G) over all real tokens.
    ``baseline="group_mean"`` is REINFORCE++-baseline: the group mean of the sequence returns is
    subtracted from G before the global whitening (OpenRLHF ``reinforce_baseline``).
    ``values`` and ``lam`` are ignored; ``group_size`` is used only with a baseline.

    Returns:
        advantages (B, T), returns == advantages; 0 on padding.
    """
    _check_right_padded(mask)
    dtype = _compute_dtype(token_rewards)
    w = mask.to(dtype)
    returns_to_go = reverse_discounted_cumsum(token_rewards.to(dtype) * w, gamma)
    if baseline == "group_mean":
        r = _groups(_sequence_returns(token_rewards, mask), group_size, "reinforce_pp baseline='group_mean'")
        returns_to_go = returns_to_go - r.mean(-1, keepdim=True).expand_as(r).reshape(-1, 1)
    elif baseline is not None:
        raise ValueError(f"reinforce_pp: unknown baseline {baseline!r}; allowed: None, 'group_mean'")
    adv = masked_whiten(returns_to_go, w)
    return adv, adv


AdvantageEstimator = Callable[..., tuple[torch.Tensor, torch.Tensor]]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": gae,
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp,
}


def compute_advantages(
    name: str, token_rewards: torch.Tensor, mask: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the estimator registered as ``name``: (B, T) rewards and mask -> (advantages, returns), (B, T) each.

    ``kwargs`` go to the estimator (values, group_size, gamma, lam, and its own options; see the module
    docstring). An unknown name is a ValueError listing the registered ones.
    """
    try:
        estimator = ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; allowed: {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None
    if not has_holes(mask):
        return estimator(token_rewards, mask, **kwargs)
    # a multi-turn episode: estimate over the policy's tokens alone, in order (rlhf_ray.algo.turns)
    if kwargs.get("values") is not None:
        kwargs["values"] = pack_policy_tokens(kwargs["values"], mask)
    packed = pack_policy_tokens(mask, mask)
    adv, ret = estimator(pack_policy_tokens(token_rewards, mask), packed, **kwargs)
    return unpack_policy_tokens(adv, mask), unpack_policy_tokens(ret, mask)
