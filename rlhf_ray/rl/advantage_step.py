"""The driver-side math of one step: the filter stage (empty responses, bad scores handled by policy) and the
advantage stage (rewards shaped, advantages estimated).

Pure torch on small (B, T) tensors; no Ray, no models.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from rlhf_ray import algo
from rlhf_ray.config import AlgorithmConfig, ReferenceConfig, RewardConfig
from rlhf_ray.errors import RunError
from rlhf_ray.records import ScoredBatch, TrainBatch


class BadRewardError(RunError, ValueError):
    """A reward was NaN or infinite and the config says to stop (reward.on_nonfinite=error)."""


class EmptyResponseError(RunError, ValueError):
    """The generator returned an empty response and rollout.on_empty_response=error."""


def filter_scored(b: ScoredBatch, reward: RewardConfig, on_empty: str,
                  ) -> tuple[ScoredBatch, ScoredBatch, dict[str, float]]:
    """The filter stage: empty responses per `rollout.on_empty_response` (`on_empty`: error, or a 0 reward),
    then `reward.on_nonfinite` and `reward.clip` (`clean_scores`). Returns (the rows that train, every row with
    its cleaned score: what the step reports, stats)."""
    empty = b.seq.response_mask.sum(1) == 0  # (B,)
    if empty.any() and on_empty == "error":
        raise EmptyResponseError(f"{int(empty.sum())} of {len(empty)} responses are empty (weight version "
                                 f"{b.weight_version}); set rollout.on_empty_response=zero_reward to score them 0 "
                                 f"and continue")
    scores = torch.where(empty, torch.zeros_like(b.scores), b.scores) if on_empty == "zero_reward" else b.scores
    scores, keep, stats = clean_scores(scores, b.group_size, reward.on_nonfinite, reward.clip)
    cleaned = replace(b, scores=scores)
    stats["response/empty_frac"] = float(empty.float().mean())
    if keep.all():
        return cleaned, cleaned, stats
    idx = keep.nonzero().flatten()
    if len(idx) == 0:
        raise ValueError("every group of this step had a non-finite reward: nothing left to train on")
    return cleaned.select(idx), cleaned, stats


def clean_scores(scores: torch.Tensor, group_size: int, policy: str, clip: float | None,
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Apply reward.on_nonfinite and reward.clip.

    Returns (scores (B,), keep (B,) bool, stats). `drop_group` removes whole groups, because a group
    estimator's baseline is meaningless with a member missing.
    """
    bad = ~torch.isfinite(scores)
    keep = torch.ones_like(scores, dtype=torch.bool)
    stats = {"reward/nonfinite": float(bad.sum())}
    if bad.any():
        if policy == "error":
            rows = bad.nonzero().flatten().tolist()
            raise BadRewardError(f"reward is NaN or infinite for {len(rows)} of {len(scores)} responses "
                                 f"(rows {rows[:8]}{'...' if len(rows) > 8 else ''}); set "
                                 f"reward.on_nonfinite=zero or drop_group to continue past such rewards")
        if policy == "drop_group":
            groups = bad.view(-1, group_size).any(dim=1)
            keep = ~groups.repeat_interleave(group_size)
        scores = torch.where(bad, torch.zeros_like(scores), scores)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores, keep, stats


def make_train_batch(batch: ScoredBatch, algo_cfg: AlgorithmConfig, ref_cfg: ReferenceConfig, kl_coef: float,
                     max_new_tokens: int | None = None) -> tuple[TrainBatch, dict[str, float]]:
    """Scores -> per-token rewards -> the registered algorithm's advantages (rlhf_ray.algo.registry).

    `max_new_tokens` is the generation limit the overlong penalty ramps towards (algorithm.overlong_buffer).
    """
    mask = batch.seq.response_mask
    spec = algo.get_algorithm(algo_cfg.name)
    scores, stats = batch.scores, {}
    if algo_cfg.overlong_buffer:
        if max_new_tokens is None:
            raise ValueError("algorithm.overlong_buffer needs the generation limit (max_new_tokens)")
        penalty = algo.overlong_penalty(mask.sum(1), max_new_tokens, algo_cfg.overlong_buffer,
                                        algo_cfg.overlong_penalty)
        scores = scores + penalty
        stats["reward/overlong_penalty_mean"] = float(penalty.mean())
    token_rewards, shaped = algo.shape_rewards(scores, batch.old_logp, batch.ref_logp, mask, kl_coef,
                                               kl_kind=ref_cfg.kl_kind, kl_in_reward=ref_cfg.kl_in_reward)
    stats.update(shaped)
    kwargs = algo.estimator_kwargs(spec, algo_cfg)
    if spec.uses_critic:
        kwargs["values"] = batch.values
    advantages, returns = algo.compute_advantages(spec.estimator, token_rewards, mask, group_size=batch.group_size,
                                                  gamma=algo_cfg.gamma, lam=algo_cfg.lam, **kwargs)
    # GAE advantages are whitened per batch (PPO practice); group/global estimators already normalise.
    if spec.batch_whiten and algo_cfg.whiten_advantages:
        advantages = algo.masked_whiten(advantages, mask) * mask
    stats.update(algo.advantage_stats(advantages, returns, mask))
    stats["response/len_mean"] = float(mask.sum(1).mean())
    return TrainBatch(batch.seq, batch.old_logp, batch.ref_logp, advantages, returns, batch.values), \
        algo.to_floats(stats)
