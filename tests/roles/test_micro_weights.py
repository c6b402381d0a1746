"""Micro-batching must not change the objective: a PPO minibatch split into micro-batches of unequal token
counts gives the same loss and gradient as the whole minibatch in one micro-batch (real `Learner`, CPU)."""
import pytest
import torch

from rlhf_ray.config.schema import AlgorithmConfig, LearnerConfig, ReferenceConfig
from rlhf_ray.learner.learner import Learner
from rlhf_ray.batch import pack_sequences
from rlhf_ray.records import TrainBatch
from rlhf_ray.roles.policy import PolicyWorker
from rlhf_ray.utils.device import resolve_backend
from tests.learner.helpers import model_cfg, plain_logprobs

pytestmark = pytest.mark.slow

# Response lengths differ a lot between the micro-batches of 2 rows: (1, 1), (6, 6), (3, 1) tokens.
LENGTHS = [1, 1, 6, 6, 3, 1]


def _batch(learner) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (3,), generator=g).tolist() for _ in LENGTHS]
    responses = [torch.randint(3, 200, (n,), generator=g).tolist() for n in LENGTHS]
    seq = pack_sequences(prompts, responses, learner.tokenizer.pad_token_id)
    old = plain_logprobs(learner, seq)  # sampled by these very weights: ratio 1, so no token is clipped
    adv = torch.randn(seq.response_mask.shape, generator=g) * seq.response_mask
    return TrainBatch(seq, old, old.clone(), adv, adv.clone(), None)


def _update(micro: int, agg: str):
    learner = Learner(model_cfg(), LearnerConfig(micro_batch_size=micro, optim={"lr": 1e-3}), kind="policy",
                      init_path="builtin:tiny", backend=resolve_backend("cpu"), total_updates=4, seed=0, num_threads=2)
    batch = _batch(learner)
    worker = PolicyWorker(learner, AlgorithmConfig(loss_agg=agg), ReferenceConfig(kl_coef=0.0), temperature=1.0,
                          norm_len=8)
    return worker.update(batch, [[torch.arange(len(LENGTHS))]], kl_coef=0.0)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_of_unequal_token_counts_give_the_minibatch_loss_and_gradient(agg):
    whole, parts = _update(6, agg), _update(2, agg)
    assert whole.agreement.max_abs < 1e-5  # the batch really was sampled by these weights
    # a non-trivial objective
    assert abs(whole.stats["policy/objective"]) > 1e-3 and whole.stats["policy/grad_norm"] > 1e-3
    # without KL or entropy terms the objective is the clipped surrogate itself (reported once, not summed twice)
    assert whole.stats["policy/loss"] == pytest.approx(whole.stats["policy/objective"], rel=1e-6)
    assert parts.stats["policy/objective"] == pytest.approx(whole.stats["policy/objective"], rel=1e-5, abs=1e-7)
    assert parts.stats["policy/grad_norm"] == pytest.approx(whole.stats["policy/grad_norm"], rel=1e-4)
