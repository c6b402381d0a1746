"""Off-policy correction between the generator that sampled a batch and the learner that trains on it.

The generator (vLLM) samples with weights that may lag the learner's (``rollout.sync.max_off_policy_lag``)
and computes log-probs with different kernels. PPO's ratio is taken against the learner's own log-probs
at the start of the update (the proximal policy); the gap to the sampling policy is corrected with a
truncated importance weight per token (Ionides 2008; "Your efficient RL framework secretly brings you
off-policy RL training", Yao et al. 2025, the TIS of verl and TRL):

    w_t = min(pi_prox(a_t) / mu(a_t), C)

Truncation at C bounds the variance a few tokens with a tiny mu could add; it biases towards mu only
where the ratio is above C.

``is_correction_weights`` names the presets (``algorithm.is_correction``), rho_t = pi_prox(a_t) / mu(a_t):

    tis           w_t = min(rho_t, C)                                     token-level truncated IS (above)
    mis           w_t = rho_i 1[rho_i <= C],  rho_i = prod_t rho_t        sequence-level masked IS ("When speed
                  kills stability", Yao, Liu et al. 2025): a sequence whose whole-sequence ratio passes C is
                  dropped, not truncated, so a broken sample adds nothing instead of C times its gradient
    icepop        w_t = rho_t 1[low <= rho_t <= high]                     IcePop (Ling team, Ring-1T 2025):
                  tokens outside the band [0.5, 5] are dropped, both sides
    seq_mask_tis  w_t = min(rho_t, C) 1[low <= g_i <= high],  g_i = exp(mean_t log rho_t)
                  a sequence whose geometric-mean ratio leaves [low, high] is dropped, the rest is token TIS
                  (OpenRLHF's seq-mask-tis)
"""

from __future__ import annotations

import torch

from rlhf_ray.algo.masked import masked_mean
# the presets and their default bands: one table, which the config loader reads without torch
from rlhf_ray.algo.registry import IS_CORRECTIONS
from rlhf_ray.algo.stats import masked_max, masked_min, to_floats

# Beyond exp(20) the ratio is truncated at C anyway; clamping keeps exp finite.
_MAX_LOG_RATIO = 20.0


@torch.no_grad()
def is_correction_weights(
    kind: str,
    proximal_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    cap: float = 2.0,
    low: float | None = None,
    high: float | None = None,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Per-token importance weights of the preset ``kind`` (module docstring), and their statistics.

    Args:
        kind: "none", "tis", "mis", "icepop" or "seq_mask_tis".
        proximal_logp: (B, T) log pi_prox(a_t), the learner before this update.
        behaviour_logp: (B, T) log mu(a_t), the generator that sampled a_t.
        mask: (B, T).
        cap: C >= 1 (tis, mis, seq_mask_tis).
        low, high: the band of icepop (token ratio) and seq_mask_tis (sequence geometric-mean ratio);
            None: the preset's default (``registry.IS_CORRECTIONS``).

    Returns:
        weights (B, T) detached, 0 on padding (None for "none"); stats "is/weight_mean", "is/masked_frac"
        (real tokens given weight 0), "is/truncated_frac" (tokens or sequences cut at C), and the ratios
        the weights were made of: "is/token_ratio_{mean,min,max}" and "is/seq_ratio_{min,max}" (geometric
        mean per sequence).
    """
    if kind not in IS_CORRECTIONS:
        raise ValueError(f"unknown IS correction {kind!r}; allowed: {sorted(IS_CORRECTIONS)}")
    if kind == "none":
        return None, {}
    if not cap >= 1.0:
        raise ValueError(f"the importance-weight cap must be >= 1, got {cap}")
    band = IS_CORRECTIONS[kind]
    if band is not None:
        low = band[0] if low is None else low
        high = band[1] if high is None else high
    m = mask.to(proximal_logp.dtype)
    log_rho = ((proximal_logp - behaviour_logp) * m).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # (B, T)
    rho = torch.exp(log_rho)
    n_tok = m.sum(-1)                                                                        # (B,)
    rows = (n_tok > 0).to(m.dtype)
    log_geo = log_rho.sum(-1) / n_tok.clamp(min=1.0)                                         # (B,)
    cut = torch.zeros_like(m)
    if kind == "tis":
        w, cut = rho.clamp(max=cap), (rho > cap).to(m.dtype)
    elif kind == "mis":
        log_seq = log_rho.sum(-1)                                                            # (B,) log prod_t
        keep = (log_seq <= torch.log(torch.tensor(cap, dtype=m.dtype))).to(m.dtype)
        w = torch.exp(log_seq.clamp(max=_MAX_LOG_RATIO))[:, None] * keep[:, None]
        cut = (1.0 - keep)[:, None].expand_as(m)
    elif kind == "icepop":
        w = rho * ((rho >= low) & (rho <= high)).to(m.dtype)
    else:  # seq_mask_tis
        g = torch.exp(log_geo)
        keep = ((g >= low) & (g <= high)).to(m.dtype)
        w, cut = rho.clamp(max=cap) * keep[:, None], (rho > cap).to(m.dtype) * keep[:, None]
    w = w * m
    seq = torch.exp(log_geo)
    stats = {
        "is/weight_mean": masked_mean(w, mask),
        "is/masked_frac": masked_mean((w == 0).to(m.dtype), mask),
        "is/truncated_frac": masked_mean(cut, mask),
        "is/token_ratio_mean": masked_mean(rho, mask),
        "is/token_ratio_min": masked_min(rho, mask),
        "is/token_ratio_max": masked_max(rho, mask),
        "is/seq_ratio_min": masked_min(seq, rows),
        "is/seq_ratio_max": masked_max(seq, rows),
    }
    return w, to_floats(stats)
