"""Thin Ray actors around the plain role classes.

Each method takes `threads`: the controller gives every role the share of the node's cores it may use
in the current phase (roles that run concurrently split the cores; a role running alone takes them
all), so that on a small machine no phase oversubscribes the CPU.
"""
from __future__ import annotations

import ray
import torch


def _threads(n: int) -> None:
    if n and torch.get_num_threads() != n:
        torch.set_num_threads(n)


@ray.remote
class PolicyActor:
    def __init__(self, *args, **kwargs):
        from rlhf_ray.rl.workers import PolicyWorker
        self.w = PolicyWorker(*args, **kwargs)

    def version(self) -> int:
        return self.w.version

    def ref_logprobs(self, seq, threads: int = 0):
        _threads(threads)
        return self.w.ref_logprobs(seq)

    def update(self, batch, minibatches, kl_coef: float, threads: int = 0):
        _threads(threads)
        return self.w.update(batch, minibatches, kl_coef)

    def named_weights(self, mode: str) -> list:
        return list(self.w.named_weights(mode))

    def adapter_config(self) -> dict:
        return self.w.adapter_config()

    def save_checkpoint(self, path: str, extra_state: dict) -> None:
        self.w.learner.save_checkpoint(path, extra_state)

    def load_checkpoint(self, path: str) -> dict:
        return self.w.learner.load_checkpoint(path)

    def export_hf(self, path: str, merge_lora: bool) -> None:
        self.w.learner.export_hf(path, merge_lora=merge_lora)


@ray.remote
class CriticActor:
    def __init__(self, *args, **kwargs):
        from rlhf_ray.rl.workers import CriticWorker
        self.w = CriticWorker(*args, **kwargs)

    def values(self, seq, threads: int = 0):
        _threads(threads)
        return self.w.values(seq)

    def update(self, batch, minibatches, threads: int = 0):
        _threads(threads)
        return self.w.update(batch, minibatches)

    def save_checkpoint(self, path: str, extra_state: dict) -> None:
        self.w.learner.save_checkpoint(path, extra_state)

    def load_checkpoint(self, path: str) -> dict:
        return self.w.learner.load_checkpoint(path)


@ray.remote
class ReferenceActor:
    def __init__(self, *args, **kwargs):
        from rlhf_ray.scoring.reference import ReferenceScorer
        self.s = ReferenceScorer(*args, **kwargs)

    def ref_logprobs(self, seq, threads: int = 0):
        _threads(threads)
        return self.s.logprobs(seq)


@ray.remote
class RewardActor:
    def __init__(self, *args, **kwargs):
        from rlhf_ray.scoring.reward import RewardScorer
        self.s = RewardScorer(*args, **kwargs)

    def score(self, prompts, responses, threads: int = 0):
        _threads(threads)
        return self.s.score(prompts, responses)
