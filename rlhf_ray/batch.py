"""From ragged token lists to aligned (B, T) training tensors.

Layout: prompts are LEFT-padded to P tokens and responses RIGHT-padded to T tokens, so every row's
response starts at column P. Then the logits that predict response token t sit at column P - 1 + t for
all rows, and every per-token tensor of the RL step (log-probs, values, advantages, mask) is a plain
(B, T) slice with the right-padded mask semantics of `rlhf_ray.algo`. Positions are counted from the
first real token so that left padding does not shift the rotary positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SequenceBatch:
    input_ids: torch.Tensor       # (B, P + T) long: [pad.. prompt][response ..pad]
    attention_mask: torch.Tensor  # (B, P + T) long: 1 on real tokens
    position_ids: torch.Tensor    # (B, P + T) long: 0 at each row's first real token
    response_mask: torch.Tensor   # (B, T) float: 1 on real response tokens
    prompt_len: int               # P

    @property
    def response_ids(self) -> torch.Tensor:  # (B, T)
        return self.input_ids[:, self.prompt_len:]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor | slice) -> "SequenceBatch":
        return SequenceBatch(self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx],
                             self.response_mask[idx], self.prompt_len)

    def trimmed(self) -> "SequenceBatch":
        """The same rows without the columns that are padding in every row: prompt columns on the left, response
        columns on the right (at least one response column stays). A micro-batch of short rows then costs its own
        width, not the whole batch's; positions count from each row's first real token, so they are unchanged
        and the forward agrees with the padded one up to float rounding. The response keeps column 0 at P'."""
        p = self.prompt_len
        real_p = self.attention_mask[:, :p].any(0)
        drop = int(real_p.long().argmax()) if bool(real_p.any()) else p  # leading prompt columns all padding
        real_t = self.response_mask.any(0).nonzero()
        keep_t = max(1, int(real_t.max()) + 1 if len(real_t) else 1)
        cols = slice(drop, p + keep_t)
        return SequenceBatch(self.input_ids[:, cols], self.attention_mask[:, cols], self.position_ids[:, cols],
                             self.response_mask[:, :keep_t], p - drop)


def pack_sequences(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                   pad_id: int, policy_mask: Sequence[Sequence[int]] | None = None) -> SequenceBatch:
    """policy_mask[b]: T_b flags, 1 where the policy sampled the response token, 0 where an environment wrote
    it (a multi-turn episode, `rlhf_ray.envs`). Environment tokens stay in the sequence (attention sees them)
    but leave `response_mask`, so no loss, KL, advantage or log-prob check counts them. None: all sampled."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    B = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    T = max(1, max(len(r) for r in response_ids))
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, P - len(p):P] = torch.as_tensor(p, dtype=torch.long)
        ids[i, P:P + len(r)] = torch.as_tensor(r, dtype=torch.long)
        attn[i, P - len(p):P + len(r)] = 1
    position_ids = (attn.cumsum(dim=1) - 1).clamp(min=0)
    response_mask = attn[:, P:].float()
    if policy_mask is not None:
        response_mask = response_mask * pad_ragged(policy_mask, T)
    return SequenceBatch(ids, attn, position_ids, response_mask, P)


def pad_ragged(rows: Sequence[Sequence[float]], width: int, fill: float = 0.0) -> torch.Tensor:
    """(B, width) float tensor from ragged rows (per-token generator log-probs)."""
    out = torch.full((len(rows), width), fill, dtype=torch.float32)
    for i, r in enumerate(rows):
        if len(r) > width:
            raise ValueError(f"row {i} has {len(r)} values, more than the batch width {width}")
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.float32)
    return out


def logits_to_keep(seq: SequenceBatch) -> int:
    """How many final positions' logits a forward must compute to predict every response token (HF's
    `logits_to_keep`): the LM head over the prompt is work nobody reads, forward and backward."""
    return seq.response_mask.shape[1] + 1


def response_logits(logits: torch.Tensor, seq: SequenceBatch) -> torch.Tensor:
    """(B, L', V) logits of the last L' positions, the whole sequence (L' = P + T) or the last
    `logits_to_keep(seq)` -> (B, T, V): the logits that predict each response token."""
    return logits[:, -logits_to_keep(seq):-1]


def minibatches(n: int, size: int, generator: torch.Generator | None = None, group: int = 1) -> list[torch.Tensor]:
    """Shuffled index sets of `size` rows, each row at most once. The config makes size divide a full
    batch; when groups were dropped (non-finite rewards) the incomplete tail is left out of this epoch.

    Rows come in groups of `group` (the samples of one prompt, adjacent). When whole groups fit, the
    groups are shuffled and kept whole, so a micro-batch holds each prompt's samples together and the
    forward computes the prompt once (`rlhf_ray.models.shared_prompt`)."""
    if group > 1 and size % group == 0 and n % group == 0:
        perm = (torch.randperm(n // group, generator=generator)[:, None] * group + torch.arange(group)).flatten()
    else:
        perm = torch.randperm(n, generator=generator)
    return [perm[i:i + size] for i in range(0, n - size + 1, size)]


def concat_sequences(parts: Sequence[SequenceBatch], pad_id: int) -> SequenceBatch:
    """One batch from several, re-padded to the widest prompt (left) and response (right): the same batch
    `pack_sequences` makes of all their rows at once (DAPO's rounds of sampling joined into one step)."""
    P = max(p.prompt_len for p in parts)
    T = max(p.response_mask.shape[1] for p in parts)

    def widen(x: torch.Tensor, p: SequenceBatch, fill) -> torch.Tensor:  # (B, P_i + T_i) -> (B, P + T)
        return torch.nn.functional.pad(x, (P - p.prompt_len, T - p.response_mask.shape[1]), value=fill)

    ids = torch.cat([widen(p.input_ids, p, pad_id) for p in parts])
    attn = torch.cat([widen(p.attention_mask, p, 0) for p in parts])
    position_ids = (attn.cumsum(dim=1) - 1).clamp(min=0)
    # each part's own response mask (environment tokens of a multi-turn episode stay out), widened on the right
    response_mask = pad_right([p.response_mask for p in parts], T)
    return SequenceBatch(ids, attn, position_ids, response_mask, P)


def pad_right(parts: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """(B_i, T_i) per-token tensors joined into (sum B_i, width), zero-padded on the right."""
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in parts])
