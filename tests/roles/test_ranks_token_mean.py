"""One PPO update on 2 learner ranks equals the same update on 1 rank (real DeepSpeed ranks on a local Ray,
gloo, tiny model), for the policy and the critic, with the token-mean aggregation.

The rows of a minibatch are chosen so that rank 0's half holds few response tokens and rank 1's half many:
a per-rank token-mean (each rank dividing by its own token count, then DeepSpeed averaging the ranks)
would weight rank 0's tokens about 4x more than one rank does, and the two updates would part.
The definition both must meet: the loss of a minibatch is the mean over all of its response tokens, on
any number of ranks and micro-batches.
"""
from __future__ import annotations

import pytest
import ray
import torch

from rlhf_ray.batch import pack_sequences
from rlhf_ray.config.schema import AlgorithmConfig, LearnerConfig, ReferenceConfig
from rlhf_ray.learner.build import load_tokenizer
from rlhf_ray.learner.group import LearnerGroup
from rlhf_ray.models.kit import resolve_model_path
from rlhf_ray.roles.critic import CriticRank
from rlhf_ray.dispatch import minibatch_micro_batches
from rlhf_ray.roles.losses import token_weight
from rlhf_ray.roles.policy import PolicyRank
from rlhf_ray.records import TrainBatch, UpdateResult
from rlhf_ray.utils.device import resolve_backend
from tests.learner.group_calls import named_weights
from tests.learner.helpers import model_cfg

# Two minibatches of 4 rows; on 2 ranks each rank takes the first / second half of a minibatch's rows.
LENGTHS = [1, 2, 1, 1, 6, 5, 6, 4]
MINIBATCHES = [[torch.tensor([0, 1, 4, 5]), torch.tensor([2, 3, 6, 7])]]  # one epoch, 2 optimizer steps
ALGO = AlgorithmConfig(name="ppo", loss_agg="token-mean")


def _group(kind: str, world: int) -> LearnerGroup:
    # micro-batches of 2 rows: 1 rank accumulates 2 micro-batches of unequal token counts per step
    cfg = LearnerConfig(num_ranks=world, micro_batch_size=2, optim={"lr": 1e-3}, deepspeed={"zero_stage": 2})
    if kind == "policy":
        rank_cls, extra = PolicyRank, dict(algo_cfg=ALGO, ref_cfg=ReferenceConfig(kl_coef=0.0), temperature=1.0,
                                           norm_len=8)
    else:
        rank_cls, extra = CriticRank, dict(algo_cfg=ALGO, norm_len=8)
    return LearnerGroup(model_cfg(), cfg, kind=kind, init_path="builtin:tiny", total_updates=4,
                        backend=resolve_backend("cpu"), num_threads=1, rank_cls=rank_cls, rank_kwargs=extra)


def _batch(group: LearnerGroup, kind: str) -> TrainBatch:
    """Sampled by the group's own (initial) weights, so the first step's PPO ratio is exactly 1."""
    g = torch.Generator().manual_seed(0)
    path = resolve_model_path("builtin:tiny")
    pad = load_tokenizer(model_cfg(), path).pad_token_id
    seq = pack_sequences([torch.randint(3, 200, (3,), generator=g).tolist() for _ in LENGTHS],
                         [torch.randint(3, 200, (n,), generator=g).tolist() for n in LENGTHS], pad)
    mask = seq.response_mask
    adv = torch.randn(mask.shape, generator=g) * mask
    if kind == "policy":
        old, _ = ray.get(group.actors[0].ref_logprobs.remote(seq))  # no LoRA, no KL: the policy's own
        return TrainBatch(seq, old * mask, old * mask, adv, adv.clone(), None)
    values, _ = ray.get(group.actors[0].values.remote(seq))
    zeros = torch.zeros_like(mask)
    return TrainBatch(seq, zeros, zeros, adv, values + adv, values)


def _update(kind: str, world: int, batch: TrainBatch | None) -> tuple[TrainBatch, dict, dict]:
    group = _group(kind, world)
    try:
        batch = batch or _batch(group, kind)
        args = (batch, MINIBATCHES, 0.0) if kind == "policy" else (batch, MINIBATCHES)
        stats = UpdateResult.merge(ray.get([a.update.remote(*args) for a in group.actors])).stats
        return batch, stats, dict(named_weights(group, "full"))
    finally:
        group.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["policy", "value"])
def test_two_ranks_update_as_one_rank_does_with_unequal_token_counts(ray_local, kind):
    batch, one, w1 = _update(kind, 1, None)
    halves = [[float(batch.seq.response_mask[half].sum()) for half in rows.chunk(2)] for rows in MINIBATCHES[0]]
    assert halves == [[3.0, 11.0], [2.0, 10.0]]  # rank 0's share of each minibatch is short, rank 1's long
    _, two, w2 = _update(kind, 2, batch)
    prefix = "policy" if kind == "policy" else "value"
    # the reported objective is the minibatch token-mean (ranks' stats are averaged by the driver)
    assert abs(one[f"{prefix}/objective"]) > 1e-3
    assert two[f"{prefix}/objective"] == pytest.approx(one[f"{prefix}/objective"], rel=1e-5, abs=1e-7)
    # the gradient itself (its norm before clipping) and the weights after two optimizer steps
    assert two[f"{prefix}/grad_norm"] == pytest.approx(one[f"{prefix}/grad_norm"], rel=1e-4)
    moved = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert moved < 1e-6, f"2 ranks ended {moved:.2e} away from 1 rank"


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_every_micro_batch_of_every_rank_counts_its_share_of_the_minibatch_tokens(world, size):
    """The weights alone (no learner): the learner scales a micro-batch's loss by n / R_rank (its rows over
    its rank's rows) times token_weight, and DeepSpeed averages the ranks (1 / world). The product must be
    the micro-batch's share t / T of the whole minibatch's tokens, on every rank."""
    mask = pack_sequences([[5]] * len(LENGTHS), [[7] * n for n in LENGTHS], 0).response_mask
    rows = torch.cat(MINIBATCHES[0])
    seen = []
    for rank in range(world):
        for mb in minibatch_micro_batches(rows, size, mask, rank, world):
            m = mask[mb["idx"]]
            coef = len(mb["idx"]) / (len(rows) // world) * token_weight("token-mean", m, mb) / world
            assert coef == pytest.approx(float(m.sum() / mask[rows].sum()), rel=1e-6), (rank, mb["idx"])
            assert token_weight("seq-mean-token-mean", m, mb) == 1.0  # row shares are already exact
            seen += mb["idx"].tolist()
    assert seen == rows.tolist()  # each row on one rank, once, in order
