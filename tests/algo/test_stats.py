import math

import pytest
import torch

from rlhf_ray.algo import (
    advantage_stats,
    approx_kl,
    clip_fraction,
    explained_variance,
    masked_max,
    masked_min,
    summary,
    to_floats,
)

X = torch.tensor([[1.0, -7.0, 100.0], [3.0, 5.0, -100.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])


def test_to_floats_keeps_order_and_plain_floats():
    out = to_floats({"a/x": torch.tensor(1.5), "b": 2.0, "c": torch.tensor([3.0])})
    assert out == {"a/x": 1.5, "b": 2.0, "c": 3.0}
    assert list(out) == ["a/x", "b", "c"] and all(type(v) is float for v in out.values())


def test_min_max_over_real_tokens_and_empty():
    assert masked_min(X, MASK).item() == -7.0
    assert masked_max(X, MASK).item() == 5.0
    assert masked_min(X, torch.zeros(2, 3)).item() == 0.0
    assert masked_max(X, torch.zeros(2, 3)).item() == 0.0


def test_summary_and_advantage_stats():
    s = to_floats(summary(X, MASK, "adv"))
    # Real values 1, -7, 3, 5: mean 0.5, unbiased var (0.25 + 56.25 + 6.25 + 20.25) / 3 = 83 / 3.
    assert s == pytest.approx({"adv/mean": 0.5, "adv/std": math.sqrt(83 / 3), "adv/min": -7.0, "adv/max": 5.0})
    both = advantage_stats(X, X * 2, MASK)
    assert both["ret/max"] == 10.0 and both["adv/min"] == -7.0 and len(both) == 8


def test_approx_kl_is_k3_of_old_vs_new():
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(2.0), 0.0]])
    # r = pi / pi_old = 2 on token 0: (2 - 1) - ln 2.
    assert approx_kl(new, old, torch.ones(1, 2)).item() == pytest.approx((1 - math.log(2.0)) / 2, abs=1e-6)
    assert approx_kl(old, old, torch.ones(1, 2)).item() == 0.0


def test_clip_fraction():
    ratio = torch.tensor([[0.7, 0.85, 1.2, 1.25, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    assert clip_fraction(ratio, mask, 0.2, 0.2).item() == pytest.approx(0.5)
    assert clip_fraction(ratio, mask, 0.2, 0.28).item() == pytest.approx(0.25)


def test_explained_variance_cases():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.5), returns, mask).item() == pytest.approx(0.0)
    assert explained_variance(-returns, returns, mask).item() < 0
    constant = torch.full((1, 4), 3.0)
    assert explained_variance(returns, constant, mask).item() == 0.0  # undefined: defined as 0
    assert explained_variance(returns, returns, torch.zeros(1, 4)).item() == 0.0
