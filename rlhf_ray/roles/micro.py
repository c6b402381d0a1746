"""The loss weight that keeps a token-mean exact across a minibatch's micro-batches, and the response logits.

Shared by the policy and the critic passes (`rlhf_ray.roles.policy`, `rlhf_ray.roles.critic`).
"""
from __future__ import annotations

import torch

from rlhf_ray.batch import SequenceBatch
from rlhf_ray.models.shared_prompt import response_logits_of

# The learner's "loss" is the whole minimised objective (surrogate + KL + entropy terms); named apart so it
# neither overwrites nor adds into the algorithm's own "policy/loss" / "value/loss" statistic.
OBJECTIVE = {"loss": "objective"}


def token_weight(agg: str, micro_mask: torch.Tensor, mb: dict) -> float:
    """The learner weights a micro-batch's loss by its share of its rank's rows (n / R_rank) and DeepSpeed
    averages the W ranks: a micro-batch counts n / R of the minibatch (R = W * R_rank rows in all). That is
    exact for sequence-mean aggregations; a token-mean over the minibatch needs its share of the
    minibatch's tokens (t / T, T over all ranks), so rescale by (t / T) / (n / R). With T counted per rank
    instead, ranks holding fewer tokens would weigh more than one rank weighs them
    (tests/rl/test_ranks_token_mean.py)."""
    if agg != "token-mean":
        return 1.0
    rows_total, tokens_total = mb["totals"][0].tolist()
    rows, tokens = micro_mask.shape[0], float(micro_mask.sum())
    return (tokens / max(tokens_total, 1.0)) / (rows / rows_total)


def forward_response_logits(learner, seq: SequenceBatch) -> torch.Tensor:
    """(B, T, V) logits that predict each response token: the LM head over those positions only, and each
    distinct prompt of the micro-batch computed once (`rlhf_ray.models.shared_prompt`)."""
    return response_logits_of(learner.forward, seq, learner.shares_prompts)
