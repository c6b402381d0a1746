import math

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.rl.advantage_step import BadRewardError, clean_scores, make_train_batch
from rlhf_ray.batch import pack_sequences
from rlhf_ray.rl.records import ScoredBatch


def test_nonfinite_policy_error_names_rows():
    with pytest.raises(BadRewardError, match=r"2 of 4 responses \(rows \[1, 3\]\)"):
        clean_scores(torch.tensor([1.0, math.nan, 0.0, math.inf]), 2, "error", None)


def test_nonfinite_zero_and_drop_group():
    s = torch.tensor([1.0, math.nan, 0.5, 2.0])
    z, keep, st = clean_scores(s, 2, "zero", None)
    assert z.tolist() == [1.0, 0.0, 0.5, 2.0] and keep.all() and st["reward/nonfinite"] == 1
    _, keep, _ = clean_scores(s, 2, "drop_group", None)
    assert keep.tolist() == [False, False, True, True]


def test_clip():
    z, _, _ = clean_scores(torch.tensor([-5.0, 0.2, 9.0]), 1, "error", 1.0)
    assert z.tolist() == pytest.approx([-1.0, 0.2, 1.0])


def _scored(scores, group):
    seq = pack_sequences([[1]] * len(scores), [[2, 3], [2], [4, 5], [6]][:len(scores)], pad_id=0)
    z = torch.zeros(len(scores), 2)
    return ScoredBatch(seq, z, z, torch.tensor(scores), None, group, 0)


def test_grpo_batch_advantages_are_group_normalised_per_sequence():
    cfg = load_config(None, ["algorithm.name=grpo", "reference.kl_coef=0"])
    tb, stats = make_train_batch(_scored([1.0, 0.0, 3.0, 3.0], 2), cfg.algorithm, cfg.reference, 0.0)
    a = tb.advantages
    # group 1: rewards 1, 0 -> +-(0.5 / std 0.7071) ; group 2 identical -> 0
    assert a[0, 0].item() == pytest.approx(0.70710, abs=1e-4) and a[0, 1].item() == pytest.approx(0.70710, abs=1e-4)
    assert a[1, 0].item() == pytest.approx(-0.70710, abs=1e-4) and a[1, 1].item() == 0.0  # padding
    assert torch.all(a[2:] == 0)
    assert stats["response/len_mean"] == 1.5
