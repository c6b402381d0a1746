"""What the learner tests call on a `LearnerGroup` beyond what the product uses: a whole optimizer step, forward
passes and the weights brought to the driver. The product drives its ranks through the roles' own shells
(`rlhf_ray.roles.policy.PolicyRank`, `rlhf_ray.roles.critic.CriticRank`); these live here, with the tests.

    group = LearnerGroup(..., rank_cls=TrainingRank)
    train_step(group, loss_fn, batch); forward(group, "logits", batch); named_weights(group, "full")
    local_weights(group, "full"); adapter_config(group)
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Literal

import ray
import torch
from ray import cloudpickle

from rlhf_ray.dispatch import Batch, gather, mean_stats, micro_batches, split_batch
from rlhf_ray.learner.group import LearnerGroup, LearnerRank
from rlhf_ray.learner.weights import drain

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/ modules


class TrainingRank(LearnerRank):
    """A plain learner rank with the calls the tests make."""

    def train_step(self, loss_fn, shard: Batch, micro_batch_size: int) -> dict:
        return self.learner.train_step(loss_fn, micro_batches(shard, micro_batch_size))

    def forward(self, method: str, shard: Batch, reference: bool) -> torch.Tensor:
        fn = {"logits": self.learner.forward_logits, "scores": self.learner.forward_scores,
              "values": self.learner.forward_values}[method]
        self.learner.ds_engine.eval()
        with torch.no_grad(), (self.learner.reference_context() if reference else contextlib.nullcontext()):
            return fn(shard["input_ids"], shard["attention_mask"]).cpu()



def train_step(group: LearnerGroup, loss_fn: Callable, batch: Batch) -> dict:
    """One optimizer step on `batch` (split over the ranks, then into micro-batches of micro_batch_size)."""
    shards = split_batch(batch, group.num_ranks)
    return mean_stats(ray.get([a.train_step.remote(loss_fn, s, group.cfg.micro_batch_size)
                               for a, s in zip(group.actors, shards)]))


def forward(group: LearnerGroup, method: Literal["logits", "scores", "values"], batch: Batch,
            reference: bool = False) -> torch.Tensor:
    """No-grad forward of `batch` ({input_ids, attention_mask}) split over the ranks; rows back in order."""
    shards = split_batch(batch, group.num_ranks)
    return gather(ray.get([a.forward.remote(method, s, reference) for a, s in zip(group.actors, shards)]))


def _rank0_weights(rank: LearnerRank, mode: str):
    """In a rank's process: rank 0's weights; the others drain theirs (ZeRO-3 gathers are collective)."""
    named = rank.learner.named_weights(mode)
    if rank.rank == 0:
        return list(named)
    if rank.learner.cfg.deepspeed.zero_stage == 3:
        drain(named)
    return None


def named_weights(group: LearnerGroup, mode: str = "full") -> list[tuple[str, torch.Tensor]]:
    """All weights to the driver (small models), from any kind of rank (plain, policy, critic)."""
    return ray.get([a.__ray_call__.remote(_rank0_weights, mode) for a in group.actors])[0]


def _local_weights(rank: LearnerRank, mode: str) -> dict:
    return dict(rank.learner.named_weights(mode))


def local_weights(group: LearnerGroup, mode: str) -> list[dict]:
    """Each rank's own view of the weights (for checks that ranks agree; every rank iterates at once)."""
    return ray.get([a.__ray_call__.remote(_local_weights, mode) for a in group.actors])


def adapter_config(group: LearnerGroup) -> dict:
    return ray.get(group.actors[0].call.remote("adapter_config"))
