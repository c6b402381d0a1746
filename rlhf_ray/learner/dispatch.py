"""Pure dispatch between the driver and N ranks: split a batch into equal shards, merge results back.

A batch is a dict of tensors sharing dim 0 (B rows). Shards are contiguous, in rank order, so
`gather(split_batch(b, n)) == b`. Uneven shards are refused: DeepSpeed averages gradients over ranks, so
ranks with different row counts would weight rows unequally.
"""
from __future__ import annotations

import torch

Batch = dict[str, torch.Tensor]


def batch_rows(batch: Batch) -> int:
    sizes = {len(v) for v in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on their row count: {sorted(sizes)}")
    return sizes.pop()


def split_batch(batch: Batch, n: int) -> list[Batch]:
    rows = batch_rows(batch)
    if rows % n:
        raise ValueError(f"a batch of {rows} rows does not split evenly over {n} ranks")
    k = rows // n
    return [{key: v[i * k:(i + 1) * k] for key, v in batch.items()} for i in range(n)]


def shard_rows(rows: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous, equal share of a set of row indices (e.g. one PPO minibatch)."""
    if len(rows) % world:
        raise ValueError(f"{len(rows)} rows do not split evenly over {world} ranks")
    k = len(rows) // world
    return rows[rank * k:(rank + 1) * k]


def micro_batches(batch: Batch, size: int) -> list[Batch]:
    """Consecutive chunks of at most `size` rows (the last may be smaller)."""
    rows = batch_rows(batch)
    return [{key: v[i:i + size] for key, v in batch.items()} for i in range(0, rows, size)]


def gather(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-rank outputs (rows first) back into one tensor in rank order; sequence dims padded with 0."""
    if parts[0].dim() >= 2 and len({p.shape[1] for p in parts}) > 1:
        n = max(p.shape[1] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, n - p.shape[1])) for p in parts]
    return torch.cat(parts)


def mean_stats(stats: list[dict]) -> dict:
    """Rank-mean of each statistic (ranks see equal row counts, so this is the batch mean)."""
    return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
