"""Direct preference optimization (Rafailov et al. 2023) from sequence log-probs. Pure torch.

Shapes: B preference pairs; sequences are (B, L) prompt + response, right-padded; `prompt_len` (B,) counts
each row's prompt tokens, so response tokens are positions >= prompt_len with attention_mask 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_ray.algo.logprobs import token_logprobs
from rlhf_ray.algo.masked import masked_sum
from rlhf_ray.algo.stats import to_floats


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_len: torch.Tensor) -> torch.Tensor:
    """log pi(response | prompt): token log-probs summed over each row's response tokens.

    Args:
        logits: (B, L, V) of a causal LM (position t predicts token t + 1).
        input_ids, attention_mask: (B, L).
        prompt_len: (B,) prompt tokens per row.

    Returns:
        (B,) fp32 sequence log-probs.
    """
    logp = token_logprobs(logits[:, :-1], input_ids[:, 1:])  # (B, L-1): scores tokens 1..L-1
    target_pos = torch.arange(1, input_ids.shape[1], device=input_ids.device)  # (L-1,)
    response = (target_pos[None, :] >= prompt_len[:, None]) & attention_mask[:, 1:].bool()  # (B, L-1)
    return masked_sum(logp, response, dim=-1)


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO sigmoid loss (Rafailov 2023, eq. 7), with conservative label smoothing (cDPO, Mitchell 2023).

    h = beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]
    L = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h), mean over pairs; eps = label_smoothing is the
    assumed probability that a pair's preference label is flipped (eps = 0 is plain DPO).

    Args:
        policy_chosen_logp, policy_rejected_logp: (B,) sequence log-probs under the trained policy, with grad.
        ref_chosen_logp, ref_rejected_logp: (B,) under the frozen reference (no grad flows into them).
        beta: strength of the implicit KL constraint (> 0).
        label_smoothing: eps in [0, 0.5).

    Returns:
        loss (0-d), stats: "dpo/loss", "dpo/reward_chosen", "dpo/reward_rejected" (mean implicit rewards
        beta * log(pi / ref)), "dpo/reward_margin" (mean h), "dpo/reward_acc" (fraction of pairs with h > 0).
    """
    if beta <= 0:
        raise ValueError(f"dpo beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    reward_chosen = beta * (policy_chosen_logp - ref_chosen_logp.detach())  # (B,)
    reward_rejected = beta * (policy_rejected_logp - ref_rejected_logp.detach())
    margin = reward_chosen - reward_rejected
    loss = (-(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)).mean()
    with torch.no_grad():
        stats = {
            "dpo/loss": loss.detach(),
            "dpo/reward_chosen": reward_chosen.mean(),
            "dpo/reward_rejected": reward_rejected.mean(),
            "dpo/reward_margin": margin.mean(),
            "dpo/reward_acc": (margin > 0).float().mean(),
        }
    return loss, to_floats(stats)
