"""DAPO dynamic sampling (Yu 2025, sec. 3.2): train only on groups whose rewards differ.

A group of n samples whose rewards are all equal has zero advantage under every group estimator (GRPO,
Dr. GRPO, RLOO): it costs a forward and backward and teaches nothing, and as a policy improves more
groups are all-correct, so the effective batch shrinks. Such groups are dropped and more prompts are
sampled, round after round, until `rl.prompts_per_step` informative groups are in hand or
`algorithm.dynamic_sampling_max_rounds` extra rounds were spent (then the batch is what was found).

`score_round` is the one place a rollout becomes a scored round (packing, the generator's log-probs,
the roles' scoring call); the controller uses it for every round, dynamic sampling or not.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from rlhf_ray.batch import SequenceBatch, pack_sequences, pad_ragged

# Rewards within this of each other count as equal: a batched forward may score identical texts a few
# ulps apart depending on their padding.
_EQUAL_TOL = 1e-6


@dataclass(frozen=True)
class Round:
    """Sampled and scored groups; rows of one prompt are contiguous (n each)."""
    rollout: object                  # generator.records.Rollout
    prompt_texts: list[str]          # (B,) the prompt each sample answers
    seq: SequenceBatch
    old_logp: torch.Tensor           # (B, T) the generator's log-probs
    scores: torch.Tensor             # (B,) float32
    ref_logp: torch.Tensor           # (B, T)
    values: Optional[torch.Tensor]   # (B, T) or None without a critic
    reward_stats: dict[str, float]


def score_round(roles, prompts: list, rollout, pad_id: int) -> Round:
    seq = pack_sequences(rollout.prompt_ids, rollout.response_ids, pad_id)
    old_logp = pad_ragged(rollout.response_logprobs, seq.response_mask.shape[1])
    texts = [prompts[i].text for i in rollout.prompt_index]
    scores, ref_logp, values, stats = roles.score(texts, rollout.texts, seq)
    return Round(rollout, texts, seq, old_logp, torch.as_tensor(scores, dtype=torch.float32), ref_logp, values,
                 dict(stats))


def informative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) scores -> (P,) bool: the group's rewards are not all equal. A NaN counts as informative, so
    `reward.on_nonfinite` still sees it."""
    g = scores.view(-1, group_size)
    spread = g.amax(1) - g.amin(1)
    return ~(spread <= _EQUAL_TOL)


def select_groups(r: Round, groups: torch.Tensor, group_size: int) -> Round:
    """Keep the groups at the (P',) indices `groups`, in that order."""
    rows = (groups.view(-1, 1) * group_size + torch.arange(group_size)).flatten()
    idx = rows.tolist()
    ro = r.rollout
    pick = (lambda xs: [xs[i] for i in idx])
    rollout = replace(ro, prompt_ids=pick(ro.prompt_ids), response_ids=pick(ro.response_ids),
                      response_logprobs=pick(ro.response_logprobs), texts=pick(ro.texts),
                      prompt_index=[i // group_size for i in range(len(idx))], finish_reasons=pick(ro.finish_reasons))
    return Round(rollout, pick(r.prompt_texts), r.seq.select(rows), r.old_logp[rows], r.scores[rows],
                 r.ref_logp[rows], None if r.values is None else r.values[rows], r.reward_stats)


def merge(rounds: list[Round], pad_id: int, group_size: int) -> Round:
    """One Round from several: sequences re-packed to a common width, per-token tensors padded right."""
    if len(rounds) == 1:
        return rounds[0]
    ro = [r.rollout for r in rounds]
    cat = (lambda attr: [x for r in ro for x in getattr(r, attr)])
    rollout = replace(ro[0], prompt_ids=cat("prompt_ids"), response_ids=cat("response_ids"),
                      response_logprobs=cat("response_logprobs"), texts=cat("texts"),
                      finish_reasons=cat("finish_reasons"), generate_s=sum(r.generate_s for r in ro),
                      prompt_index=[i // group_size for i in range(sum(len(r.texts) for r in ro))])
    seq = pack_sequences(rollout.prompt_ids, rollout.response_ids, pad_id)
    width = seq.response_mask.shape[1]
    pad = (lambda ts: torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in ts]))
    values = None if rounds[0].values is None else pad([r.values for r in rounds])
    stats: dict[str, float] = {}
    for r in rounds:  # times add up; other reward stats are averaged over rounds
        for k, v in r.reward_stats.items():
            stats[k] = stats.get(k, 0.0) + (v if k.startswith("time/") else v / len(rounds))
    return Round(rollout, [t for r in rounds for t in r.prompt_texts], seq,
                 pad_ragged(rollout.response_logprobs, width), torch.cat([r.scores for r in rounds]),
                 pad([r.ref_logp for r in rounds]), values, stats)


def fill_batch(first: Round, sample_more: Callable[[], Round], group_size: int, target_groups: int,
               max_rounds: int, pad_id: int) -> tuple[Round, dict[str, float]]:
    """Informative groups of `first`, topped up from `sample_more()` rounds until `target_groups` are
    found or `max_rounds` extra rounds were spent; trimmed to `target_groups`.

    If no round had a single informative group, `first` is returned whole (its advantages are 0: the
    step then changes nothing but the KL term, rather than stopping the run).
    """
    kept: list[Round] = []
    found = dropped = sampled = rounds = 0
    current = first
    while True:
        ok = informative_groups(current.scores, group_size)
        sampled, dropped = sampled + len(ok), dropped + int((~ok).sum())
        take = ok.nonzero().flatten()[:target_groups - found]
        if len(take):
            kept.append(select_groups(current, take, group_size))
            found += len(take)
        if found >= target_groups or rounds >= max_rounds:
            break
        current, rounds = sample_more(), rounds + 1
    stats = {"dynamic_sampling/dropped_groups": float(dropped), "dynamic_sampling/extra_rounds": float(rounds),
             "dynamic_sampling/kept_groups": float(found),
             "dynamic_sampling/dropped_frac": dropped / max(sampled, 1)}
    if not kept:
        return first, stats
    return merge(kept, pad_id, group_size), stats
