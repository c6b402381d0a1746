"""DAPO dynamic sampling (Yu 2025, sec. 3.2): train only on groups whose rewards differ.

A group of n samples whose rewards are all equal has zero advantage under every group estimator (GRPO,
Dr. GRPO, RLOO): it costs a forward and backward and teaches nothing, and as a policy improves more
groups are all-correct, so the effective batch shrinks. Such groups are dropped and more prompts are
sampled, round after round, until `rl.prompts_per_step` informative groups are in hand or
`algorithm.dynamic_sampling_max_rounds` extra rounds were spent (then the batch is what was found).

Works on the score stage's record (`ScoredBatch`): each round is one, and the step goes on with one.
"""
from __future__ import annotations

from typing import Callable

import torch

from rlhf_ray.records import ScoredBatch

# Rewards within this of each other count as equal: a batched forward may score identical texts a few
# ulps apart depending on their padding.
_EQUAL_TOL = 1e-6


def informative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) scores -> (P,) bool: the group's rewards are not all equal. A NaN counts as informative, so
    `reward.on_nonfinite` still sees it."""
    g = scores.view(-1, group_size)
    spread = g.amax(1) - g.amin(1)
    return ~(spread <= _EQUAL_TOL)


def select_groups(b: ScoredBatch, groups: torch.Tensor) -> ScoredBatch:
    """Keep the groups at the (P',) indices `groups`, in that order."""
    n = b.group_size
    return b.select((groups.view(-1, 1) * n + torch.arange(n)).flatten())


def fill_batch(first: ScoredBatch, sample_more: Callable[[], ScoredBatch], target_groups: int, max_rounds: int,
               pad_id: int) -> tuple[ScoredBatch, dict[str, float]]:
    """Informative groups of `first`, topped up from `sample_more()` rounds until `target_groups` are
    found or `max_rounds` extra rounds were spent; trimmed to `target_groups`.

    If no round had a single informative group, `first` is returned whole (its advantages are 0: the
    step then changes nothing but the KL term, rather than stopping the run).
    """
    kept: list[ScoredBatch] = []
    found = dropped = sampled = rounds = 0
    current = first
    while True:
        ok = informative_groups(current.scores, current.group_size)
        sampled, dropped = sampled + len(ok), dropped + int((~ok).sum())
        take = ok.nonzero().flatten()[:target_groups - found]
        if len(take):
            kept.append(select_groups(current, take))
            found += len(take)
        if found >= target_groups or rounds >= max_rounds:
            break
        current, rounds = sample_more(), rounds + 1
    stats = {"dynamic_sampling/dropped_groups": float(dropped), "dynamic_sampling/extra_rounds": float(rounds),
             "dynamic_sampling/kept_groups": float(found),
             "dynamic_sampling/dropped_frac": dropped / max(sampled, 1)}
    if not kept:
        return first, stats
    return ScoredBatch.concat(kept, pad_id), stats
