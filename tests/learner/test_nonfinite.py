"""A NaN/inf loss or gradient is never applied: `stop` names the step, `skip` drops and counts it."""
from __future__ import annotations

import pytest
import torch

from rlhf_ray.config.schema import LearnerConfig
from rlhf_ray.learner.learner import Learner
from rlhf_ray.learner.finite import NonFiniteError, nonfinite
from rlhf_ray.offline.stages import sft_step_loss
from rlhf_ray.utils.device import resolve_backend
from tests.learner.helpers import model_cfg, split, token_batches


def test_nonfinite_names_what():
    assert nonfinite(1.0, 2.0) is None and nonfinite(None, None) is None
    assert nonfinite(float("nan"), 1.0) == "loss is nan"
    assert nonfinite(1.0, float("inf")) == "gradient norm is inf"


def _learner(on_nonfinite: str) -> Learner:
    cfg = LearnerConfig(micro_batch_size=4, optim={"lr": 3e-3}, on_nonfinite=on_nonfinite)
    return Learner(model_cfg(), cfg, kind="policy", init_path="builtin:tiny", backend=resolve_backend("cpu"),
                   total_updates=10, seed=0, num_threads=2)


def nan_loss_on_second_micro_batch(learner, mb, calls=[0]):  # noqa: B006 - a counter across calls on purpose
    loss, stats = sft_step_loss(learner, mb)
    calls[0] += 1
    return (loss * float("nan") if calls[0] % 2 == 0 else loss), stats


def inf_gradient(learner, mb):
    logits = learner.forward_logits(mb["input_ids"], mb["attention_mask"])
    return torch.sqrt((logits * 0).sum()), {}  # value 0, gradient 0 * inf = nan


def _weights(learner):
    return {k: v.clone() for k, v in learner.hf_model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("bad_fn,says", [(nan_loss_on_second_micro_batch, "loss is nan"),
                                         (inf_gradient, "gradient norm is nan")])
def test_stop_names_the_step_and_applies_nothing(bad_fn, says):
    learner = _learner("stop")
    learner.train_step(sft_step_loss, split(token_batches(1)[0]))
    before = _weights(learner)
    with pytest.raises(NonFiniteError, match=f"policy update 2 refused: {says}"):
        learner.train_step(bad_fn, split(token_batches(1, seed=1)[0]))
    assert learner.updates == 1
    assert all(torch.equal(before[k], v) for k, v in _weights(learner).items())


@pytest.mark.slow
def test_skip_counts_and_leaves_training_as_if_the_step_never_came():
    skipping, clean = _learner("skip"), _learner("skip")
    good, bad = token_batches(2, seed=3)
    stats = skipping.train_step(inf_gradient, split(bad))
    assert stats == {"policy/nonfinite_skipped": 1.0} and skipping.updates == 0
    assert skipping.train_step(sft_step_loss, split(good))["policy/nonfinite_skipped"] == 0.0
    clean.train_step(sft_step_loss, split(good))
    a, b = _weights(skipping), _weights(clean)
    assert all(torch.equal(a[k], b[k]) for k in a)  # optimizer state and schedule untouched by the skip
