"""Checks that make a broken or skipped weight sync fail loudly instead of training on wrong data.

Two independent guards:
- `check_version`: every rollout carries the weight version it was sampled with; a batch older than
  the learner by more than `max_off_policy_lag` versions is refused.
- `logprob_agreement` + `check_logprob_agreement`: the learner recomputes log pi(a|s) of the sampled
  tokens; if the generator really ran the learner's weights the two agree to numerical noise
  (STACK.md: fp32 vLLM vs HF about 3e-5; bf16 about 0.2). A sync that silently failed shows up as a
  large difference on the very first step.
Pure torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from rlhf_ray.utils.device import logprob_tolerance


class StaleWeightsError(RuntimeError):
    """A rollout batch was generated with weights older than the learner allows."""


class LogprobMismatchError(RuntimeError):
    """Learner and generator disagree on the log-probs of the sampled tokens: the weights differ."""


def check_version(rollout_version: int, learner_version: int, max_off_policy_lag: int = 0) -> int:
    """Raise StaleWeightsError if `learner_version - rollout_version > max_off_policy_lag`; return the lag."""
    lag = learner_version - rollout_version
    if lag < 0:
        raise StaleWeightsError(f"rollout weight version {rollout_version} is newer than the learner's "
                                f"{learner_version}: versions are not being counted in one place")
    if lag > max_off_policy_lag:
        raise StaleWeightsError(f"rollout was generated with weight version {rollout_version} but the learner is at "
                                f"version {learner_version} (lag {lag} > rollout.sync.max_off_policy_lag="
                                f"{max_off_policy_lag}); was a weight sync skipped?")
    return lag


@dataclass(frozen=True)
class Agreement:
    """|learner - generator| log-probs of the sampled tokens, over `num_tokens` response tokens, and the
    ratio learner / generator they make: per token and per sequence (its geometric mean over the
    sequence's tokens), the numbers the IS corrections (algorithm.is_correction) act on."""
    max_abs: float
    mean_abs: float
    num_tokens: int
    token_ratio_min: float = 1.0
    token_ratio_max: float = 1.0
    seq_ratio_min: float = 1.0
    seq_ratio_max: float = 1.0

    @staticmethod
    def merge(parts: Sequence["Agreement"]) -> "Agreement":
        """One agreement from parts over disjoint tokens (micro-batches, ranks): the max of the maxima, the
        token-weighted mean of the means, the extremes of the ratios."""
        tokens = sum(p.num_tokens for p in parts)
        mean = sum(p.mean_abs * p.num_tokens for p in parts) / max(tokens, 1)
        real = [p for p in parts if p.num_tokens] or [Agreement(0.0, 0.0, 0)]
        return Agreement(max((p.max_abs for p in parts), default=0.0), mean, tokens,
                         min(p.token_ratio_min for p in real), max(p.token_ratio_max for p in real),
                         min(p.seq_ratio_min for p in real), max(p.seq_ratio_max for p in real))

    def metrics(self) -> dict[str, float]:
        return {"sync/logprob_max_abs": self.max_abs, "sync/logprob_mean_abs": self.mean_abs,
                "sync/logprob_num_tokens": float(self.num_tokens),
                "sync/token_ratio_min": self.token_ratio_min, "sync/token_ratio_max": self.token_ratio_max,
                "sync/seq_ratio_min": self.seq_ratio_min, "sync/seq_ratio_max": self.seq_ratio_max}


def logprob_agreement(learner_logp: torch.Tensor, generator_logp: torch.Tensor, mask: torch.Tensor) -> Agreement:
    """Max and mean |learner - generator| over the response tokens.

    learner_logp, generator_logp: (B, T) log pi(a_t|s_t) of the sampled tokens, T = response length.
    mask: (B, T), 1 for real response tokens, 0 for padding.
    """
    if learner_logp.shape != generator_logp.shape or learner_logp.shape != mask.shape:
        raise ValueError(f"shapes differ: learner {tuple(learner_logp.shape)}, generator "
                         f"{tuple(generator_logp.shape)}, mask {tuple(mask.shape)}")
    m = mask.bool().to(learner_logp.device)
    delta = learner_logp.double() - generator_logp.double().to(learner_logp.device)  # (B, T) log-ratio
    diff = delta.abs()[m]
    n = int(diff.numel())
    if n == 0:
        return Agreement(0.0, 0.0, 0)
    rows = m.any(-1)
    seq_log = (delta * m).sum(-1)[rows] / m.sum(-1)[rows]  # (B',) mean log-ratio of each sequence
    tok = delta[m].clamp(-20, 20).exp()
    seq = seq_log.clamp(-20, 20).exp()
    return Agreement(float(diff.max()), float(diff.mean()), n, float(tok.min()), float(tok.max()),
                     float(seq.min()), float(seq.max()))


def agreement_thresholds(sync_cfg, dtypes: tuple[str, ...] = ()):
    """The sync config with the log-prob agreement thresholds it leaves unset taken from the precisions
    in use (`rlhf_ray.utils.device.LOGPROB_TOLERANCE`; none named: fp32's); set thresholds always win."""
    max_abs, mean_abs = logprob_tolerance(dtypes)
    return sync_cfg.model_copy(update={"logprob_max_abs_diff": sync_cfg.logprob_max_abs_diff or max_abs,
                                       "logprob_mean_abs_diff": sync_cfg.logprob_mean_abs_diff or mean_abs})


def check_logprob_agreement(stats: Agreement, sync_cfg, version: Optional[int] = None,
                            correction: str = "none") -> Optional[str]:
    """Raise LogprobMismatchError if `stats` exceed `sync_cfg.logprob_max_abs_diff` / `logprob_mean_abs_diff`,
    unless `sync_cfg.on_logprob_mismatch` is "correct": then return the one line saying by how much and
    which preset (`correction`, algorithm.is_correction) weighed the gap out. None: within the thresholds.

    A non-finite difference always fails (NaN compares false to every threshold; no weight corrects it).
    Does nothing when `sync_cfg.logprob_check` is off.
    """
    if not sync_cfg.logprob_check:
        return None
    limits = agreement_thresholds(sync_cfg)  # unset: fp32's (the controller passes them per precision)
    max_lim, mean_lim = limits.logprob_max_abs_diff, limits.logprob_mean_abs_diff
    max_abs, mean_abs = stats.max_abs, stats.mean_abs
    bad = []
    if not (max_abs <= max_lim):
        bad.append(f"max |diff| {max_abs:.4g} > rollout.sync.logprob_max_abs_diff={max_lim}")
    if not (mean_abs <= mean_lim):
        bad.append(f"mean |diff| {mean_abs:.4g} > rollout.sync.logprob_mean_abs_diff={mean_lim}")
    if not bad:
        return None
    where = f"weight version {version}" if version is not None else "this batch"
    finite = math.isfinite(max_abs) and math.isfinite(mean_abs)
    if sync_cfg.on_logprob_mismatch == "correct" and correction != "none" and finite:
        return (f"learner and generator log-probs disagree for {where} over {stats.num_tokens} tokens ("
                + "; ".join(bad) + f"); corrected by algorithm.is_correction={correction} "
                  f"(rollout.sync.on_logprob_mismatch=correct)")
    raise LogprobMismatchError(f"learner and generator log-probs disagree for {where} over "
                               f"{stats.num_tokens} tokens: " + "; ".join(bad)
                               + ". The generator is not running the learner's weights (a failed or skipped "
                                 "sync, a dtype mismatch, or a temperature/logprobs_mode mismatch); or set "
                                 "algorithm.is_correction and rollout.sync.on_logprob_mismatch=correct to weigh "
                                 "a known gap out")
