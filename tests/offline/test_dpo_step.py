"""The DPO step on a real single-rank `Learner` (no Ray): the reference is the frozen start, with or without LoRA."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.offline.dpo import DPOStep
from tests.learner.helpers import make_learner, split

pytestmark = pytest.mark.slow


def _pairs(rows: int = 8, seed: int = 0) -> dict:
    """Chosen continues the pattern token+1, rejected repeats a token; 3 prompt tokens; equal lengths."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(3, 40, (rows, 1), generator=g)
    prompt = start + torch.arange(3)
    chosen = torch.cat([prompt, prompt[:, -1:] + 1 + torch.arange(6)], 1)
    rejected = torch.cat([prompt, prompt[:, -1:].repeat(1, 6)], 1)
    mask = torch.ones_like(chosen)
    return {"chosen_ids": chosen, "chosen_mask": mask, "rejected_ids": rejected, "rejected_mask": mask,
            "prompt_len": torch.full((rows,), 3)}


@pytest.mark.parametrize("lora", [False, True])
def test_starts_at_log2_and_margin_grows_against_a_frozen_reference(lora):
    learner = make_learner(lora=lora, lr=1e-2)
    step = DPOStep(beta=0.5, label_smoothing=0.0)
    batch = _pairs()
    first = learner.train_step(step, split(batch))
    assert first["dpo/reward_margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for _ in range(8):
        last = learner.train_step(step, split(batch))
    # if the reference followed the policy, the margin would stay 0
    assert last["dpo/reward_margin"] > 1.0 and last["dpo/reward_acc"] == 1.0, last
    learner.ds_engine.eval()
    with torch.no_grad():
        seen = step.evaluate(learner, batch)
    assert seen["accuracy"] == 1.0 and seen["margin"] > 1.0 and seen["loss"] < math.log(2)
