"""Pure dispatch between the driver and N ranks or engines: split work into shards, merge results back.

Shards are contiguous and in rank order, so merging them back restores the original order.
"""
from __future__ import annotations

from typing import Sequence


def split_evenly(items: Sequence, k: int) -> list[list]:
    """k contiguous chunks whose sizes differ by at most one (the first ones are the larger): prompts over
    engines, which may take unequal shares."""
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    q, r = divmod(len(items), k)
    out, start = [], 0
    for i in range(k):
        end = start + q + (1 if i < r else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def mean_stats(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Rank-mean of each statistic: ranks hold equal row counts, so this is the batch mean."""
    return {k: sum(s[k] for s in per_rank) / len(per_rank) for k in per_rank[0]}
