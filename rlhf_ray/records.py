"""Typed records of one RL step, one per stage of the dataflow (below every role: the roles read and write them,
the controller passes them on):

    generate  -> Rollout       (token ids, log-probs and texts as the engines sampled them)
    score     -> ScoredBatch   (+ scores, reference log-probs, values)
    filter    -> ScoredBatch   (DAPO's informative groups; finite, clipped scores; rows dropped by policy)
    advantage -> TrainBatch    (+ advantages, returns)
    update    -> UpdateResult  (statistics, the log-prob agreement, compute seconds)
    sync      -> SyncStats     (rlhf_ray.sync.weight_sync)

Every field is present at its stage; `values` exist only when the algorithm has a critic. The tensor form of a
Rollout for the learner is `rlhf_ray.batch.pack_sequences`.

Symbols: P prompts in a generation call, n samples per prompt, B = P * n samples, T the (padded) response
length, T_b the length of sample b's response, Lp_b the length of its prompt.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from rlhf_ray.batch import SequenceBatch, concat_sequences, pad_right
from rlhf_ray.dispatch import mean_stats
from rlhf_ray.sync.checks import Agreement


@dataclass(frozen=True)
class Rollout:
    """B sampled responses; every list has length B, samples of one prompt are contiguous (n each).

    prompt_ids[b]:         Lp_b token ids of the prompt that sample b answers (repeated for each sample).
    response_ids[b]:       T_b sampled token ids (stop/EOS token included when the model emitted it).
    response_logprobs[b]:  T_b floats, log softmax(logits / temperature)[token] of each sampled token,
                           under the weights of `weight_version` (vLLM `logprobs_mode="processed_logprobs"`);
                           with temperature 0 (greedy) the temperature is taken as 1.
    texts[b]:              the decoded response.
    prompt_index[b]:       index of the prompt in the `generate` call's prompt list (0..P-1).
    finish_reasons[b]:     "stop" (EOS or a stop string) or "length" (max_new_tokens reached).
    weight_version:        the version of the weights every sample was generated with.
    temperature:           the sampling temperature the log-probs are scaled with.
    generate_s:            seconds the engine spent inside vLLM (the slowest engine's, for a group);
                           the controller subtracts it from the phase's wall time to measure overhead.
    policy_mask[b]:        T_b flags of a multi-turn episode (`rlhf_ray.envs.episode`): 1 where the engine
                           sampled the token, 0 where the environment wrote it (its log-prob entry is 0.0 and
                           is never read). None: a single-turn rollout, every token sampled.
    response_versions[b]:  T_b weight versions, the one that sampled each token: a partial rollout
                           (`rollout.partial`, `rlhf_ray.rl.producer`) continues its sequences under every
                           weight push that lands while it runs. None: every token at `weight_version`, which
                           for a partial rollout is its oldest token's (the one its staleness is bounded by).
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    response_logprobs: list[list[float]]
    texts: list[str]
    prompt_index: list[int]
    finish_reasons: list[str]
    weight_version: int
    temperature: float
    generate_s: float = 0.0
    policy_mask: Optional[list[list[int]]] = None
    response_versions: Optional[list[list[int]]] = None

    def __len__(self) -> int:
        return len(self.response_ids)

    def finished(self) -> list[bool]:
        """Per sample, False where the generator cut it at its token limit: a reward model reads such a response
        as written, without EOS (`rlhf_ray.roles.reward.ModelSource`)."""
        return [reason != "length" for reason in self.finish_reasons]

    def token_versions(self) -> list[list[int]]:
        """T_b versions per sample (`response_versions`, or `weight_version` for every token)."""
        if self.response_versions is not None:
            return self.response_versions
        return [[self.weight_version] * len(r) for r in self.response_ids]


def concat_rollouts(parts: list[Rollout], prompt_offsets: list[int]) -> Rollout:
    """Join per-engine rollouts in order; `prompt_offsets[i]` shifts part i's prompt_index to the global one."""
    if not parts:
        raise ValueError("no rollouts to concatenate")
    versions = {p.weight_version for p in parts}
    if len(versions) != 1:
        raise ValueError(f"engines answered with different weight versions {sorted(versions)}: a sync is incomplete")
    return Rollout(
        prompt_ids=[x for p in parts for x in p.prompt_ids],
        response_ids=[x for p in parts for x in p.response_ids],
        response_logprobs=[x for p in parts for x in p.response_logprobs],
        texts=[x for p in parts for x in p.texts],
        prompt_index=[i + off for p, off in zip(parts, prompt_offsets) for i in p.prompt_index],
        finish_reasons=[x for p in parts for x in p.finish_reasons],
        weight_version=versions.pop(),
        temperature=parts[0].temperature,
        generate_s=max(p.generate_s for p in parts),
    )


@dataclass(frozen=True)
class ScoredBatch:
    """The score stage's record (and, filtered, the filter stage's): rows of one prompt are contiguous."""
    seq: SequenceBatch
    old_logp: torch.Tensor          # (B, T) log pi_old(a_t|s_t) as the generator sampled them
    ref_logp: torch.Tensor          # (B, T) log pi_ref(a_t|s_t)
    scores: torch.Tensor            # (B,) combined reward (finite once filtered)
    values: Optional[torch.Tensor]  # (B, T) V(s_t) from the critic; None without a critic
    group_size: int                 # n samples per prompt, contiguous rows
    weight_version: int             # policy version the rollout was sampled with
    prompts: list[str]              # (B,) the prompt text each row answers
    responses: list[str]            # (B,) the response text
    reward_stats: dict[str, float]  # the scorers' statistics ("time/..." summed over DAPO rounds, others averaged)

    def __len__(self) -> int:
        return len(self.seq)

    def select(self, idx: torch.Tensor) -> "ScoredBatch":
        """The rows `idx` (a 1-d index tensor), in that order."""
        rows = idx.tolist()
        return replace(self, seq=self.seq.select(idx), old_logp=self.old_logp[idx], ref_logp=self.ref_logp[idx],
                       scores=self.scores[idx], values=None if self.values is None else self.values[idx],
                       prompts=[self.prompts[i] for i in rows], responses=[self.responses[i] for i in rows])

    @staticmethod
    def concat(parts: list["ScoredBatch"], pad_id: int) -> "ScoredBatch":
        """One batch from several (DAPO's rounds): sequences re-packed to a common width, per-token tensors
        padded right; timings of the scorers add up, their other statistics are averaged."""
        if len(parts) == 1:
            return parts[0]
        seq = concat_sequences([p.seq for p in parts], pad_id)
        width = seq.response_mask.shape[1]
        stats: dict[str, float] = {}
        for p in parts:
            for k, v in p.reward_stats.items():
                stats[k] = stats.get(k, 0.0) + (v if k.startswith("time/") else v / len(parts))
        first = parts[0]
        return ScoredBatch(seq, pad_right([p.old_logp for p in parts], width),
                           pad_right([p.ref_logp for p in parts], width), torch.cat([p.scores for p in parts]),
                           None if first.values is None else pad_right([p.values for p in parts], width),
                           first.group_size, first.weight_version, [x for p in parts for x in p.prompts],
                           [x for p in parts for x in p.responses], stats)


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

    def trimmed(self) -> "TrainBatch":
        """Without the columns that are padding in every row (`SequenceBatch.trimmed`); per-token tensors keep
        the response columns that stay. A micro-batch's forward and loss then run over its own width."""
        seq = self.seq.trimmed()
        t = seq.response_mask.shape[1]
        cut = (lambda x: None if x is None else x[:, :t])
        return TrainBatch(seq, cut(self.old_logp), cut(self.ref_logp), cut(self.advantages), cut(self.returns),
                          cut(self.old_values))


@dataclass(frozen=True)
class UpdateResult:
    """What an update (PPO epochs of the policy, and the critic's) reports back to the controller."""
    stats: dict[str, float]        # "policy/..." and "value/..." statistics, means over the update's steps
    agreement: Optional[Agreement]  # learner vs generator log-probs on the first forward; None: no policy update
    compute_s: float               # forward/backward seconds on the phase's critical path

    @staticmethod
    def merge(ranks: list["UpdateResult"]) -> "UpdateResult":
        """One role's ranks (equal rows each): rank-mean statistics, the agreement over all their tokens, the
        slowest rank's seconds."""
        agreements = [r.agreement for r in ranks if r.agreement is not None]
        return UpdateResult(mean_stats([r.stats for r in ranks]), Agreement.merge(agreements) if agreements else None,
                            max(r.compute_s for r in ranks))

    def with_critic(self, critic: "UpdateResult", beside: bool) -> "UpdateResult":
        """The policy's result and the critic's: `beside` (their own processes, at once) the slower one's
        seconds, else (one process, one after the other) the sum."""
        secs = max(self.compute_s, critic.compute_s) if beside else self.compute_s + critic.compute_s
        return UpdateResult({**self.stats, **critic.stats}, self.agreement, secs)

    def metrics(self) -> dict[str, float]:
        return {**self.stats, **(self.agreement.metrics() if self.agreement else {}),
                "time/update_compute_s": self.compute_s}
