"""Thin Ray actors of the RL roles.

Policy and critic are learner ranks (`LearnerRank` + the RL passes of `rlhf_ray.rl.workers`), so they
run on N ranks placed by `LearnerGroup`; the reference and reward scorers are single actors.
Each method takes `threads`: the controller gives every role the share of the node's cores it may use
in the current phase (roles that run concurrently split the cores; a role running alone takes them all),
so that on a small machine no phase oversubscribes the CPU.
"""
from __future__ import annotations

import time

import ray
import torch

from rlhf_ray.learner.dispatch import shard_rows
from rlhf_ray.learner.group import LearnerRank


def _threads(n: int) -> None:
    if n and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _timed(fn, *args):
    """(result, seconds spent computing it in this process): the controller's overhead accounting."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _my_share(minibatches: list[list[torch.Tensor]], rank: int, world: int) -> list[list[torch.Tensor]]:
    return [[shard_rows(rows, rank, world) for rows in epoch] for epoch in minibatches]


class PolicyRank(LearnerRank):
    def __init__(self, rank: int, world_size: int, num_threads: int, *, algo, ref, temperature: float,
                 norm_len: int):
        super().__init__(rank, world_size, num_threads)
        self._rl = dict(algo_cfg=algo, ref_cfg=ref, temperature=temperature, norm_len=norm_len)
        self._worker = None

    @property
    def worker(self):
        if self._worker is None:  # the learner exists only after `setup`
            from rlhf_ray.rl.workers import PolicyWorker
            self._worker = PolicyWorker(self.learner, **self._rl)
        return self._worker

    def ref_logprobs(self, seq, threads: int = 0):
        _threads(threads)
        return _timed(self.worker.ref_logprobs, seq)

    def update(self, batch, minibatches, kl_coef: float, threads: int = 0) -> dict:
        _threads(threads)
        stats, secs = _timed(self.worker.update, batch, _my_share(minibatches, self.rank, self.world_size), kl_coef)
        return {**stats, "time/compute_s": secs}


class CriticRank(LearnerRank):
    def __init__(self, rank: int, world_size: int, num_threads: int, *, algo, norm_len: int):
        super().__init__(rank, world_size, num_threads)
        self._rl = dict(algo_cfg=algo, norm_len=norm_len)
        self._worker = None

    @property
    def worker(self):
        if self._worker is None:
            from rlhf_ray.rl.workers import CriticWorker
            self._worker = CriticWorker(self.learner, **self._rl)
        return self._worker

    def values(self, seq, threads: int = 0):
        _threads(threads)
        return _timed(self.worker.values, seq)

    def update(self, batch, minibatches, threads: int = 0) -> dict:
        _threads(threads)
        stats, secs = _timed(self.worker.update, batch, _my_share(minibatches, self.rank, self.world_size))
        return {**stats, "time/compute_s": secs}


@ray.remote
class ReferenceActor:
    def __init__(self, *args, **kwargs):
        from rlhf_ray.scoring.reference import ReferenceScorer
        self.s = ReferenceScorer(*args, **kwargs)

    def ref_logprobs(self, seq, threads: int = 0):
        _threads(threads)
        return _timed(self.s.logprobs, seq)


@ray.remote
class RewardActor:
    def __init__(self, *args, **kwargs):
        from rlhf_ray.scoring.reward import RewardScorer
        self.s = RewardScorer(*args, **kwargs)

    def score(self, prompts, responses, threads: int = 0):
        _threads(threads)
        return _timed(self.s.score, prompts, responses)
