"""The critic role (PPO): values V(s_t) and the clipped value loss, on its own learner ranks (distributed)
or beside the policy in one process (colocated). `CriticWorker` is the plain class, `CriticRank` its Ray shell.
"""
from __future__ import annotations

import time

import torch

from rlhf_ray.batch import SequenceBatch
from rlhf_ray.config import AlgorithmConfig
from rlhf_ray.learner.group import LearnerRank
from rlhf_ray.dispatch import micro_batches_of, per_token_over_micro_batches, scoring_micro_batches
from rlhf_ray.roles.losses import OBJECTIVE, critic_minibatch_loss, forward_sequence_values, token_weight
from rlhf_ray.records import TrainBatch, UpdateResult
from rlhf_ray.utils.phases import set_phase_threads, timed


class CriticWorker:
    """PPO's value model: the policy's backbone with a scalar head, trained with the clipped value loss."""

    def __init__(self, learner, algo_cfg: AlgorithmConfig, *, norm_len: int):
        self.learner = learner
        self.algo, self.mbs, self.norm_len = algo_cfg, learner.cfg.micro_batch_size, norm_len
        self.max_tokens = learner.cfg.max_tokens_per_micro_batch  # None: micro-batches of mbs rows

    @torch.no_grad()
    def values(self, seq: SequenceBatch, team=None) -> torch.Tensor:
        """(B, T) V(s_t) for each response position t (the state before token t is emitted); each micro-batch's
        rows split over `team` (`rlhf_ray.utils.phases.CoreTeam`; None: one pass)."""
        self.learner.ds_engine.eval()

        def values_of(mb: SequenceBatch) -> torch.Tensor:
            T, P = mb.response_mask.shape[1], mb.prompt_len
            v = forward_sequence_values(self.learner, mb).float()
            return (v[:, P - 1:P - 1 + T] * mb.response_mask.to(v.device)).cpu()
        return per_token_over_micro_batches(seq, scoring_micro_batches(seq, self.mbs, self.max_tokens), values_of, team,
                                            packed=self.learner.packed_mask_dtype is not None)

    def update(self, batch: TrainBatch, minibatches: list[list[torch.Tensor]], rank: int = 0,
               world: int = 1) -> UpdateResult:
        """One optimizer step per minibatch (of all ranks; this rank runs its share, as the policy does)."""
        t0 = time.perf_counter()

        def loss_fn(learner, mb):
            tb = batch.select(mb["idx"].cpu()).trimmed()  # the micro-batch's own width
            values = forward_sequence_values(learner, tb.seq).float()
            loss, stats = critic_minibatch_loss(values, tb, self.algo, self.norm_len)
            return loss * token_weight(self.algo.loss_agg, tb.seq.response_mask, mb), stats

        sums: dict[str, float] = {}
        steps = 0
        for epoch in minibatches:
            for rows in epoch:
                mine = micro_batches_of(rows, batch.seq, self.mbs, self.max_tokens, rank, world)
                for k, v in self.learner.train_step(loss_fn, mine).items():
                    key = k if "/" in k else f"value/{OBJECTIVE.get(k, k)}"
                    sums[key] = sums.get(key, 0.0) + v
                steps += 1
        return UpdateResult({k: v / max(steps, 1) for k, v in sums.items()}, None, time.perf_counter() - t0)


class CriticRank(LearnerRank):
    """The critic's Ray shell: `CriticWorker(learner, algo_cfg=, norm_len=)`."""
    WORKER = CriticWorker

    def values(self, seq, threads: int = 0):
        set_phase_threads(threads)
        return timed(self.worker.values, seq)

    def update(self, batch, minibatches, threads: int = 0, cores=None) -> UpdateResult:
        set_phase_threads(threads, cores)
        return self.worker.update(batch, minibatches, self.rank, self.world_size)
