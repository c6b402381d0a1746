"""Pure dispatch between the driver and N ranks or engines: split work into shards, merge results back.

The one home of these rules (both placements, the learner group, the offline workers and the PPO passes call
them). Shards are contiguous and in rank order, so merging them back restores the original order. Rows are
split into EQUAL shards over learner ranks: DeepSpeed averages gradients over ranks and ZeRO-3 forwards are
collectives, so ranks holding unequal row counts would weight rows unequally (or hang); prompts over engines
may be unequal (`split_evenly`). A batch is a dict of tensors sharing dim 0, or a `SequenceBatch`.
"""
from __future__ import annotations

from typing import Optional, Sequence

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


# -- token-budget micro-batches --------------------------------------------------------------------
def prompt_runs(seq: SequenceBatch, rows: torch.Tensor) -> list[torch.Tensor]:
    """`rows` (indices into `seq`, in their order) cut into runs of consecutive rows that share a prompt: a
    GRPO group is one run, so a micro-batch made of whole runs computes each prompt once
    (`rlhf_ray.models.shared_prompt`)."""
    if len(rows) == 0:
        return []
    p = seq.prompt_len
    key = torch.cat([seq.input_ids[rows, :p], seq.attention_mask[rows, :p]], dim=1)  # (R, 2P)
    starts = [0] + [i for i in range(1, len(rows)) if not torch.equal(key[i], key[i - 1])]
    return [rows[a:b] for a, b in zip(starts, starts[1:] + [len(rows)])]


def row_lengths(seq: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) real prompt and (B,) real response lengths: a micro-batch's padded width is max prompt + max
    response (prompts are left-padded, responses right-padded: `rlhf_ray.batch`)."""
    p = seq.prompt_len
    return seq.attention_mask[:, :p].sum(-1), seq.response_mask.sum(-1).long()


def pack_by_tokens(runs: list[torch.Tensor], prompt_len: torch.Tensor, response_len: torch.Tensor,
                   budget: int) -> list[torch.Tensor]:
    """Micro-batches of whole runs whose padded size rows x (max prompt + max response) stays within `budget`
    tokens. Runs are taken longest response first, so long rows pad only to each other and short ones pack
    many to a micro-batch; a run larger than the budget alone is a micro-batch of its own (never split).
    prompt_len, response_len: (B,) per row of the batch the runs index."""
    order = sorted(range(len(runs)), key=lambda i: -int(response_len[runs[i]].max()))
    out, cur, n, p_max, t_max = [], [], 0, 0, 0
    for i in order:
        run = runs[i]
        p, t = int(prompt_len[run].max()), max(1, int(response_len[run].max()))
        if cur and (n + len(run)) * (max(p_max, p) + max(t_max, t)) > budget:
            out.append(torch.cat(cur))
            cur, n, p_max, t_max = [], 0, 0, 0
        cur.append(run)
        n, p_max, t_max = n + len(run), max(p_max, p), max(t_max, t)
    if cur:
        out.append(torch.cat(cur))
    return out


def _split_to(parts: list[torch.Tensor], count: int, seq: SequenceBatch) -> list[torch.Tensor]:
    """`parts` split until there are `count`: the largest part in two, at a prompt-run boundary when it has
    more than one run, else between rows. DeepSpeed's gradient reductions (ZeRO-2) and ZeRO-3's forwards are
    collectives, so every rank must run as many micro-batches as the others."""
    parts = list(parts)
    while len(parts) < count:
        i = max(range(len(parts)), key=lambda j: len(parts[j]))
        big = parts.pop(i)
        runs = prompt_runs(seq, big)
        if len(runs) > 1:
            half = len(runs) // 2
            a, b = torch.cat(runs[:half]), torch.cat(runs[half:])
        else:
            a, b = big[:len(big) // 2], big[len(big) // 2:]
        parts[i:i] = [a, b]
    return parts


def token_budget_micro_batches(rows: torch.Tensor, seq: SequenceBatch, budget: int, rank: int = 0,
                               world: int = 1) -> list[dict[str, torch.Tensor]]:
    """`minibatch_micro_batches` by a token budget instead of a row count (`*.max_tokens_per_micro_batch`):
    rank `rank`'s equal share of the minibatch `rows`, packed by `pack_by_tokens` with each prompt's rows
    together, and as many micro-batches on every rank (each rank computes every rank's packing, the same
    pure function of the same batch, and splits its own up to the largest count). Each carries the whole
    minibatch's row and token counts (`rlhf_ray.roles.losses.token_weight`)."""
    total = torch.tensor([len(rows), float(seq.response_mask[rows].sum())])
    p_len, t_len = row_lengths(seq)
    plans = [pack_by_tokens(prompt_runs(seq, shard_rows(rows, r, world)), p_len, t_len, budget)
             for r in range(world)]
    mine = _split_to(plans[rank], max(len(p) for p in plans), seq)
    return [{"idx": idx, "totals": total.expand(len(idx), 2)} for idx in mine]


def scoring_micro_batches(seq: SequenceBatch, rows: int, budget: Optional[int]) -> list[torch.Tensor]:
    """Row indices of a scorer's micro-batches over all of `seq`: `rows` at a time in order, or, with a token
    `budget`, whole prompt runs packed by `pack_by_tokens` (the caller puts each result back by its indices)."""
    if budget is None:
        return [torch.arange(i, min(i + rows, len(seq))) for i in range(0, len(seq), rows)]
    p_len, t_len = row_lengths(seq)
    return pack_by_tokens(prompt_runs(seq, torch.arange(len(seq))), p_len, t_len, budget)


def per_token_over_micro_batches(seq: SequenceBatch, parts: list[torch.Tensor], fn, team=None,
                                 packed: bool = False) -> torch.Tensor:
    """(B, T) results of `fn` over micro-batches: `fn(micro_seq)` gets the rows `parts[i]` without their
    all-padding columns (`SequenceBatch.trimmed`) and returns (b, T_i) per-token values (on the host), which land
    back at their rows; padding is 0 (what a padded position held before depended on the micro-batch's width).
    team: a `rlhf_ray.utils.phases.CoreTeam`; each micro-batch's rows are cut into its size of pieces
    (`cut_rows`; `packed`: fn packs its rows without their padding), computed at once (a micro-batch's rows are
    what the memory allows in flight)."""
    out = torch.zeros(len(seq), seq.response_mask.shape[1])

    def run(idx: torch.Tensor) -> tuple[SequenceBatch, torch.Tensor]:
        mb = seq.select(idx).trimmed()
        return mb, fn(mb)
    for part in parts:
        pieces = cut_rows(part, team.size, seq, packed) if team is not None else [part]
        for idx, (mb, r) in zip(pieces, team.map(run, pieces) if team is not None else map(run, pieces)):
            out = out.to(r.dtype)
            out[idx, :r.shape[1]] = r * mb.response_mask.to(r.dtype)
    return out


def cut_rows(rows: torch.Tensor, k: int, seq: SequenceBatch, packed: bool = False) -> list[torch.Tensor]:
    """`rows` in at most k pieces to compute at once: whole prompt runs (each piece still computes its prompts
    once), longest first. Padded forwards: cut by `balanced_cut` into pieces of about equal padded size (a piece
    pads to its own longest row, so long rows kept together and short ones together compute less padding than
    halves in order). `packed` (the forward packs each piece without its padding, `rlhf_ray.models.packed`):
    dealt in turn (`dealt`), so every piece holds long and short rows alike and packs as tightly as the whole;
    a piece of long rows alone leaves nothing to pack (the reference pass of 32 rows of ragged responses on a
    2-thread team, AMD EPYC Zen 3: 13 long rows padded beside 19 short ones packed, 80 ms; dealt, both packed, 63).
    Fewer runs than pieces: the rows one by one (a piece may then hold part of a run)."""
    runs = prompt_runs(seq, rows)
    if len(runs) < k:
        runs = [r.view(1) for r in rows]
    p_len, t_len = row_lengths(seq)
    if packed:
        order = sorted(range(len(runs)), key=lambda i: -int((p_len[runs[i]] + t_len[runs[i]]).max()))
        return [torch.cat([runs[order[i]] for i in piece]) for piece in dealt(len(runs), k)]
    sizes = [(len(r), int(p_len[r].max()), int(t_len[r].max())) for r in runs]
    order = sorted(range(len(runs)), key=lambda i: -sizes[i][2])
    return [torch.cat([runs[order[i]] for i in piece]) for piece in balanced_cut([sizes[i] for i in order], k)]


def dealt(n: int, k: int) -> list[list[int]]:
    """Positions 0 .. n-1 (items longest first) dealt to at most k pieces in turn, forth and back (pieces 0 .. k-1,
    then k-1 .. 0, ...), so each piece gets about as many items, and as long ones, as every other."""
    pieces: list[list[int]] = [[] for _ in range(min(k, n))]
    for i in range(n):
        lap, j = divmod(i, len(pieces))
        pieces[j if lap % 2 == 0 else len(pieces) - 1 - j].append(i)
    return pieces


def balanced_cut(sizes: list[tuple[int, int, int]], k: int) -> list[list[int]]:
    """Items (rows, prompt length, response length), in the order given, into at most k contiguous pieces:
    the smallest bound on a piece's padded size, rows x (longest prompt + longest response), that a greedy
    cut meets (binary search). Returns each piece's item positions."""
    def cut(bound: int) -> list[list[int]]:
        out: list[list[int]] = []
        n = p = t = 0
        for i, (rows, pl, tl) in enumerate(sizes):
            if out and (n + rows) * (max(p, pl) + max(t, tl)) <= bound:
                out[-1].append(i)
                n, p, t = n + rows, max(p, pl), max(t, tl)
            else:
                out.append([i])
                n, p, t = rows, pl, tl
        return out
    if not sizes:
        return []
    lo = max(r * (pl + tl) for r, pl, tl in sizes)
    hi = sum(r for r, _, _ in sizes) * (max(pl for _, pl, _ in sizes) + max(tl for _, _, tl in sizes))
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(cut(mid)) <= k else (mid + 1, hi)
    return cut(lo)


def micro_batches_of(rows: torch.Tensor, seq: SequenceBatch, size: int, max_tokens: Optional[int], rank: int = 0,
                     world: int = 1) -> list[dict[str, torch.Tensor]]:
    """A PPO minibatch's micro-batches for rank `rank`: `size` rows each, or by the token budget `max_tokens`
    (`*.max_tokens_per_micro_batch`; `token_budget_micro_batches`)."""
    if max_tokens is None:
        return minibatch_micro_batches(rows, size, seq.response_mask, rank, world)
    return token_budget_micro_batches(rows, seq, max_tokens, rank, world)
