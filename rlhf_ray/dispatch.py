"""Pure dispatch between the driver and N ranks or engines: split work into shards, merge results back.

The one home of these rules (both placements, the learner group, the offline workers and the PPO passes call
them). Shards are contiguous and in rank order, so merging them back restores the original order. Rows are
split into EQUAL shards over learner ranks: DeepSpeed averages gradients over ranks and ZeRO-3 forwards are
collectives, so ranks holding unequal row counts would weight rows unequally (or hang); prompts over engines
may be unequal (`split_evenly`). A batch is a dict of tensors sharing dim 0, or a `SequenceBatch`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from rlhf_ray.batch import SequenceBatch

Batch = dict[str, torch.Tensor]


# -- split -------------------------------------------------------------------------------------
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


def _equal_share(rows: int, n: int) -> int:
    if rows % n:
        raise ValueError(f"a batch of {rows} rows does not split evenly over {n} ranks")
    return rows // n


def batch_rows(batch: Batch) -> int:
    sizes = {len(v) for v in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on their row count: {sorted(sizes)}")
    return sizes.pop()


def split_batch(batch: Batch, n: int) -> list[Batch]:
    """n contiguous, equal shards of a dict batch."""
    k = _equal_share(batch_rows(batch), n)
    return [{key: v[i * k:(i + 1) * k] for key, v in batch.items()} for i in range(n)]


def split_rows(seq: SequenceBatch, n: int) -> list[SequenceBatch]:
    """n contiguous, equal shards of a sequence batch (scoring over ranks)."""
    k = _equal_share(len(seq), n)
    return [seq.select(slice(i * k, (i + 1) * k)) for i in range(n)]


def shard_rows(rows: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous, equal share of a set of row indices (e.g. one PPO minibatch)."""
    k = _equal_share(len(rows), world)
    return rows[rank * k:(rank + 1) * k]


def micro_batches(batch: Batch, size: int) -> list[Batch]:
    """A rank's dict batch in consecutive chunks of at most `size` rows (the last may be smaller)."""
    rows = batch_rows(batch)
    return [{key: v[i:i + size] for key, v in batch.items()} for i in range(0, rows, size)]


def minibatch_micro_batches(rows: torch.Tensor, size: int, mask: torch.Tensor, rank: int = 0,
                            world: int = 1) -> list[dict[str, torch.Tensor]]:
    """Rank `rank`'s micro-batches of a PPO minibatch (`rows`: its row indices; the rank takes its contiguous,
    equal share), each carrying the row and token counts of the WHOLE minibatch over all ranks, which the
    token-mean loss weight needs (`rlhf_ray.roles.losses.token_weight`). mask: (B, T) response mask of the batch."""
    total = torch.tensor([len(rows), float(mask[rows].sum())])
    mine = shard_rows(rows, rank, world)
    return [{"idx": mine[i:i + size], "totals": total.expand(len(mine[i:i + size]), 2)}
            for i in range(0, len(mine), size)]


# -- merge -------------------------------------------------------------------------------------
def gather(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-rank outputs (rows first) back into one tensor in rank order; sequence dims padded with 0."""
    if parts[0].dim() >= 2 and len({p.shape[1] for p in parts}) > 1:
        n = max(p.shape[1] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, n - p.shape[1])) for p in parts]
    return torch.cat(parts)


def mean_stats(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Rank-mean of each statistic: ranks hold equal row counts, so this is the batch mean."""
    return {k: sum(s[k] for s in per_rank) / len(per_rank) for k in per_rank[0]}
