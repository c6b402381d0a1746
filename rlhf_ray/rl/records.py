"""Typed records of one RL step, one per stage of the dataflow:

    generator -> Rollout (rlhf_ray.generator.records)
    scorers   -> ScoredBatch   (+ scores, reference log-probs, values)
    advantage -> TrainBatch    (+ advantages, returns)

Every field is present at its stage; `values` exist only when the algorithm has a critic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from rlhf_ray.batch import SequenceBatch


@dataclass(frozen=True)
class ScoredBatch:
    seq: SequenceBatch
    old_logp: torch.Tensor          # (B, T) log pi_old(a_t|s_t) as the generator sampled them
    ref_logp: torch.Tensor          # (B, T) log pi_ref(a_t|s_t)
    scores: torch.Tensor            # (B,) combined reward, finite
    values: Optional[torch.Tensor]  # (B, T) V(s_t) from the critic; None without a critic
    group_size: int                 # n samples per prompt, contiguous rows
    weight_version: int             # policy version the rollout was sampled with


@dataclass(frozen=True)
class TrainBatch:
    seq: SequenceBatch
    old_logp: torch.Tensor          # (B, T)
    ref_logp: torch.Tensor          # (B, T)
    advantages: torch.Tensor        # (B, T) A_t, 0 on padding
    returns: torch.Tensor           # (B, T) critic targets (== advantages without a critic)
    old_values: Optional[torch.Tensor]  # (B, T)

    def select(self, idx: torch.Tensor) -> "TrainBatch":
        pick = (lambda t: None if t is None else t[idx])
        return TrainBatch(self.seq.select(idx), self.old_logp[idx], self.ref_logp[idx], self.advantages[idx],
                          self.returns[idx], pick(self.old_values))
