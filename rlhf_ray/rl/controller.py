"""The RL controller: one step reads as the dataflow.

    prompts -> generate -> score (reward | reference | value, concurrently) -> filter -> advantages
            -> PPO epochs (policy, critic) -> log-prob check -> weight sync -> KL controller -> log

With `rollout.mode=async` the generate stage takes the oldest batch a driver thread sampled ahead
(`rlhf_ray.rl.producer`): the rest of the step is the same.

Each stage hands the next one record (`rlhf_ray.records`): Rollout -> ScoredBatch -> (filtered) ScoredBatch
-> TrainBatch -> UpdateResult -> SyncStats.

The roles are a `RoleGraph` (`rlhf_ray.rl.roles`: Ray actors behind a placement, or local objects); the
controller owns only small driver-side state: the prompt stream, the KL controller and the step. The weight
version is the sync's (`roles.weights`, `rlhf_ray.sync.weight_sync`).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch

from rlhf_ray import algo
from rlhf_ray.batch import minibatches, pack_sequences, pad_ragged
from rlhf_ray.config import AlgorithmConfig, ReferenceConfig, RewardConfig, RLConfig, RolloutConfig
from rlhf_ray.envs.episode import EpisodeRunner, Episodes
from rlhf_ray.records import Rollout
from rlhf_ray.records import ScoredBatch
from rlhf_ray.rl.advantage_step import EmptyResponseError, filter_scored, make_train_batch  # noqa: F401
from rlhf_ray.rl.dynamic_sampling import fill_batch
from rlhf_ray.rl.producer import AsyncRollouts
from rlhf_ray.rl.prompt_stream import PromptStream
from rlhf_ray.rl.roles import RoleGraph, sample_again_if_an_engine_died
from rlhf_ray.sync.checks import agreement_thresholds, check_logprob_agreement, check_version
from rlhf_ray.utils.phases import PhaseTimer

if TYPE_CHECKING:
    from rlhf_ray.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepConfig:
    """The config sections an RL step reads: the controller is given these, not the whole `Config`."""
    rollout: RolloutConfig      # samples per prompt, max_new_tokens, empty responses; the sync's lag and checks
    reward: RewardConfig        # non-finite and out-of-range scores
    reference: ReferenceConfig  # the KL controller and the KL term
    algorithm: AlgorithmConfig  # advantages, minibatches, PPO epochs, dynamic sampling
    rl: RLConfig                # prompts per step, steps
    seed: int                   # `run.seed`: the minibatch shuffle and each step's generation seed
    env_weight: float = 1.0     # `env.reward_weight`: an episode's reward in the score

    @classmethod
    def of(cls, cfg: "Config") -> "StepConfig":
        return cls(cfg.rollout, cfg.reward, cfg.reference, cfg.algorithm, cfg.rl, cfg.run.seed, cfg.env.reward_weight)


@dataclass
class StepOutput:
    metrics: dict[str, float]
    prompts: list[str]
    responses: list[str]
    scores: list[float]
    episodes: list[dict] = field(default_factory=list)  # per row with an environment: turns, tool calls, tokens


def score_rollout(roles: RoleGraph, prompts: list, rollout: Rollout, pad_id: int, n: int,
                  episodes: Optional[Episodes] = None, env_weight: float = 1.0) -> ScoredBatch:
    """The score stage: the rollout (n samples per prompt) packed into aligned sequences with the generator's
    log-probs, and the roles' reward, reference log-probs and values for them. With episodes (an environment),
    environment tokens are masked out of the sequences and each episode's reward is added to its score."""
    seq = pack_sequences(rollout.prompt_ids, rollout.response_ids, pad_id, rollout.policy_mask)
    old_logp = pad_ragged(rollout.response_logprobs, seq.response_mask.shape[1])
    texts = [prompts[i].text for i in rollout.prompt_index]
    scores, ref_logp, values, stats = roles.score(texts, list(rollout.texts), rollout.finished(), seq)
    scores = torch.as_tensor(scores, dtype=torch.float32)
    stats = dict(stats)
    if episodes is not None:
        env = torch.as_tensor(episodes.rewards, dtype=torch.float32)
        scores = scores + env_weight * env
        stats["reward/env_mean"] = float(env.mean())
    return ScoredBatch(seq, old_logp, ref_logp, scores, values, n, rollout.weight_version, texts,
                       list(rollout.texts), stats)


def make_kl_controller(r: ReferenceConfig):
    if r.adaptive_kl:
        return algo.AdaptiveKLController(r.kl_coef, r.kl_target, r.kl_horizon)
    return algo.FixedKLController(r.kl_coef)


class RLController:
    def __init__(self, cfg: StepConfig, roles: RoleGraph, prompts: PromptStream, pad_id: int,
                 dtypes: tuple[str, ...] = ("float32",), episodes: Optional[EpisodeRunner] = None,
                 decode: Optional[Callable[[list[list[int]]], list[str]]] = None):
        """cfg: the sections of the run's config a step reads (`StepConfig.of(config)`).
        dtypes: the precisions the learner and the engine compute in (the plan's); they pick the
        log-prob agreement thresholds the config leaves unset.
        episodes: with an environment (`env.path`), each sample is a multi-turn episode run by this runner.
        decode: response ids -> texts with the policy's tokenizer (a partial rollout's text is decoded whole)."""
        self.cfg, self.roles, self.prompts, self.pad_id = cfg, roles, prompts, pad_id
        self.episodes = episodes
        self.agreement = agreement_thresholds(cfg.rollout.sync, dtypes)
        self.kl_ctl = make_kl_controller(cfg.reference)
        self.step_idx = 0
        self._shuffle = torch.Generator().manual_seed(cfg.seed)
        self._next = None  # (prompts, pending rollout, prompt-stream state before them) when overlapping
        # rollout.mode=async: batches sampled ahead by a driver thread (rlhf_ray.rl.producer)
        self._async = (AsyncRollouts(roles, prompts, cfg.rollout, self._seed, decode)
                       if cfg.rollout.mode == "async" else None)

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> StepOutput:
        cfg, roles, t = self.cfg, self.roles, PhaseTimer()
        n = cfg.rollout.n_samples_per_prompt
        with t("generate"):
            prompts, rollout, episodes, async_stats = self._generate(n)  # Rollout (and the episodes behind it)
        lag = check_version(rollout.weight_version, roles.weights.version, cfg.rollout.sync.max_off_policy_lag)
        engine_s = [rollout.generate_s]
        with t("score"):
            scored = score_rollout(roles, prompts, rollout, self.pad_id, n, episodes, cfg.env_weight)  # ScoredBatch
        ds_stats = {}
        if cfg.algorithm.dynamic_sampling:  # DAPO: only groups whose rewards differ, topped up
            with t("dynamic_sampling"):
                scored, ds_stats = fill_batch(scored, lambda: self._sample_more(n, engine_s), cfg.rl.prompts_per_step,
                                              cfg.algorithm.dynamic_sampling_max_rounds, self.pad_id)
        kept, reported, filter_stats = filter_scored(scored, cfg.reward, cfg.rollout.on_empty_response)
        with t("advantage"):
            batch, adv_stats = make_train_batch(kept, cfg.algorithm, cfg.reference, self.kl_ctl.value,
                                                 cfg.rollout.max_new_tokens)  # TrainBatch
            minibatches = self._minibatches(len(batch.seq))
        overlapped = self._start_next_generation(n)
        with t("update"):
            update = roles.update(batch, minibatches, self.kl_ctl.value, overlapped=overlapped)  # UpdateResult
        corrected = None  # a lockstep mismatch beyond the bound fails here, or the named preset weighed it out
        if lag == 0 and update.agreement is not None:
            corrected = check_logprob_agreement(update.agreement, self.agreement, version=rollout.weight_version,
                                                correction=cfg.algorithm.is_correction)
            if corrected:
                log.warning(corrected)
        with t("sync"), (self._async.engines if self._async else contextlib.nullcontext()):
            pushed = roles.weights.push()  # SyncStats; None: every optimizer step was refused, nothing changed
        # Ziegler 2019's rule is in KL per sequence and counts samples (horizon is in samples).
        self.kl_ctl.update(adv_stats.get("kl/seq_mean", 0.0), len(batch.seq))
        self.step_idx += 1

        timing, engine = t.stats(), sum(engine_s)
        metrics = {**scored.reward_stats, **(episodes.metrics() if episodes else {}), **filter_stats, **ds_stats,
                   **async_stats,
                   **adv_stats, **update.metrics(), **(pushed.metrics() if pushed else {}), **timing,
                   "reward/score_mean": float(kept.scores.mean()),
                   "reward/score_std": float(kept.scores.std()) if len(kept) > 1 else 0.0,
                   "kl/coef": self.kl_ctl.value, "sync/version": float(roles.weights.version),
                   "sync/lag": float(lag), "sync/overlapped": float(overlapped),
                   "sync/logprob_over_bound": float(corrected is not None),
                   "throughput/tokens_per_s": tokens_per_s(float(scored.seq.response_mask.sum()), t.times["generate"],
                                                           engine),
                   # an overlapped generation hides behind the previous update: only its wait is on the path
                   **overhead(timing["timing/step_s"], min(engine, t.times["generate"]),
                              (scored.reward_stats.get("time/score_compute_s", 0.0), update.compute_s))}
        return StepOutput(metrics, reported.prompts, reported.responses, reported.scores.tolist(),
                          [s.as_dict() for s in episodes.stats] if episodes else [])

    # -- helpers -------------------------------------------------------------------------------
    def _generate(self, n: int) -> tuple[list, Rollout, Optional[Episodes], dict[str, float]]:
        """This step's prompts and rollout: sampled now, or, with rollouts allowed one version behind, during
        the previous step's update (`_start_next_generation`), or (async) by the producer thread."""
        if self._async is not None:
            prompts, rollout, stats = self._async.take(n, self.cfg.rl.steps - self.step_idx)
            return prompts, rollout, None, stats
        if self._next is not None:
            prompts, pending, _ = self._next
            self._next = None
            ids, seed = [p.ids for p in prompts], self._seed(self.step_idx)  # the seed it was submitted with
            # an engine that died while it sampled beside the update: the same rollout asked again, now alone
            rollout = sample_again_if_an_engine_died(pending.result, lambda: self.roles.submit(ids, n, seed).result())
            return prompts, rollout, None, {}
        prompts = self.prompts.next_batch()
        return (prompts, *self._sample(prompts, n, self._seed(self.step_idx)), {})

    def close(self) -> None:
        """Stop the async producer (if any): the batches it sampled ahead of the last step are not trained."""
        if self._async is not None:
            self._async.close()

    def _sample(self, prompts: list, n: int, seed: int) -> tuple[Rollout, Optional[Episodes]]:
        """n samples per prompt: one generation, or with an environment n episodes per prompt, each turn of all
        live episodes one generation on every engine."""
        if self.episodes is None:
            return self.roles.generate([p.ids for p in prompts], n, seed), None
        episodes = self.episodes.run(lambda ids, limits, s: self.roles.generate(ids, 1, s, max_new_tokens=limits),
                                     [p.ids for p in prompts], [p.row for p in prompts], n, seed)
        return episodes.rollout, episodes

    def _start_next_generation(self, n: int) -> bool:
        """With rollouts allowed one version behind, sample the next step now, on the generator's cores,
        while the learner updates on the others. Every `sync.check_every`-th step is left in lockstep so
        the log-prob agreement check (which needs lag 0) keeps running."""
        sync = self.cfg.rollout.sync
        if self.cfg.rollout.mode == "async":
            return True  # the producer thread samples beside every update
        nxt = self.step_idx + 1
        if sync.max_off_policy_lag < 1 or nxt >= self.cfg.rl.steps or nxt % sync.check_every == 0 \
                or self.episodes is not None:  # episodes run turn by turn from here, in lockstep
            return False
        before = self.prompts.state_dict()
        prompts = self.prompts.next_batch()
        self._next = (prompts, self.roles.submit([p.ids for p in prompts], n, self._seed(nxt)), before)
        return True

    def _sample_more(self, n: int, engine_s: list[float]) -> ScoredBatch:
        """Another round for dynamic sampling: the next prompts of the stream, sampled and scored (the engines'
        seconds added to `engine_s`)."""
        prompts = self.prompts.next_batch()
        rollout, episodes = self._sample(prompts, n, self._seed(self.step_idx))
        engine_s.append(rollout.generate_s)
        return score_rollout(self.roles, prompts, rollout, self.pad_id, n, episodes, self.cfg.env_weight)

    def _seed(self, step: int) -> int:
        """Step s samples from a seed of (run seed, s): a resumed run samples what the uninterrupted one did."""
        return generation_seed(self.cfg.seed, step)

    def _minibatches(self, n_rows: int) -> list[list[torch.Tensor]]:
        """Index sets per PPO epoch; drawn here so the shuffle is part of the driver's resumable state."""
        size = min(self.cfg.algorithm.mini_batch_size, n_rows)
        n = self.cfg.rollout.n_samples_per_prompt
        return [minibatches(n_rows, size, self._shuffle, group=n) for _ in range(self.cfg.algorithm.ppo_epochs)]

    # -- resumable state -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        # A rollout in flight is not saved: a resumed run samples that batch again (with current weights). In
        # async mode neither are the producer's buffer and its partial sequences: the resume point is the prompt
        # stream after the last batch taken, and the resumed run samples the rest again (`load_state_dict` says so).
        if self._async is not None:
            prompts = self._async.resume_point()
        else:
            prompts = self._next[2] if self._next is not None else self.prompts.state_dict()
        return {"step": self.step_idx, "prompts": prompts, "kl": self.kl_ctl.state_dict(),
                "shuffle": self._shuffle.get_state().tolist(), "version": self.roles.weights.version,
                "batch": self._async.next_index if self._async is not None else self.step_idx}

    def load_state_dict(self, d: dict) -> None:
        """The driver's state of a checkpoint whose roles were just loaded: the engines then serve the restored
        weights at the saved version."""
        self.step_idx = int(d["step"])
        self.prompts.load_state_dict(d["prompts"])
        self.kl_ctl.load_state_dict(d["kl"])
        self._shuffle.set_state(torch.tensor(d["shuffle"], dtype=torch.uint8))
        self.roles.weights.restore(int(d["version"]))
        if self._async is not None:
            self._async.resumed(int(d.get("batch", self.step_idx)), self.step_idx)


def generation_seed(run_seed: int, step: int) -> int:
    return (run_seed * 1_000_003 + step * 7919) % (2 ** 30)


def tokens_per_s(tokens: float, wait_s: float, engine_s: float) -> float:
    """The generator's rate: tokens over the time their generation took. In lockstep that is the driver's
    generate phase (wall time, the engine's seconds plus Ray's hand-off). An overlapped rollout (one step
    behind) was sampled beside the previous update and the driver only waited for its tail (often ~0 s,
    which printed millions of tok/s): there the engine's own seconds are its duration. So: the longer of
    the two. Not the step's wall time: the step's pace is `timing/step_s`; this one compares engines."""
    return tokens / max(wait_s, engine_s, 1e-9)


def overhead(step_s: float, generate_s: float, compute: tuple[float, float]) -> dict[str, float]:
    """Framework overhead: the step's wall time not spent generating or in forward/backward passes
    (weight sync, Ray calls, packing, advantages). Compute is each phase's critical path, measured
    inside the actors."""
    busy = generate_s + compute[0] + compute[1]
    return {"timing/compute_s": busy, "timing/overhead_s": max(0.0, step_s - busy),
            "timing/overhead_frac": max(0.0, step_s - busy) / max(step_s, 1e-9)}
