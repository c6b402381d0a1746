import pytest
import torch

from rlhf_ray.algo import last_token_index, shape_rewards

# Lengths 3, 1, 0 in T = 4. Real tokens have log pi - log ref = 0.1; padding holds junk.
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
REF = torch.full((3, 4), -2.0, dtype=torch.float64)
LOGP = torch.where(MASK.bool(), REF + 0.1, torch.tensor(50.0, dtype=torch.float64))
SCORES = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)


def test_last_token_index():
    assert last_token_index(MASK).tolist() == [2, 0, -1]


def test_kl_in_reward_hand_computed():
    rewards, stats = shape_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.5, kl_kind="k1")
    expected = torch.tensor(
        [[-0.05, -0.05, 0.95, 0.0], [1.95, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-12)
    assert stats["kl/mean"] == pytest.approx(0.1, abs=1e-12)
    assert stats["kl/seq_mean"] == pytest.approx((0.3 + 0.1 + 0.0) / 3, abs=1e-12)
    assert stats["kl/coef"] == 0.5
    assert stats["reward/score_mean"] == pytest.approx(2.0)
    assert stats["reward/seq_mean"] == pytest.approx((0.85 + 1.95) / 3, abs=1e-12)
    assert all(isinstance(v, float) for v in stats.values())


def test_kl_out_of_reward_keeps_only_the_score():
    rewards, stats = shape_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.5, kl_in_reward=False)
    expected = torch.tensor([[0, 0, 1.0, 0], [2.0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(rewards, expected, rtol=0, atol=0)
    assert stats["kl/mean"] == pytest.approx(0.1, abs=1e-12)


def test_kl_kind_is_used():
    rewards, _ = shape_rewards(SCORES, LOGP, REF, MASK, kl_coef=1.0, kl_kind="k2")
    assert rewards[0, 0].item() == pytest.approx(-0.5 * 0.1**2, abs=1e-12)


def test_rewards_are_detached():
    logp = LOGP.clone().requires_grad_(True)
    rewards, _ = shape_rewards(SCORES, logp, REF, MASK, kl_coef=0.5)
    assert not rewards.requires_grad


def test_overlong_penalty_hand_computed():
    from rlhf_ray.algo import overlong_penalty
    lengths = torch.tensor([10, 16, 18, 20, 24])
    # L_max 24, buffer 8: free up to 16, then -(len - 16) / 8
    got = overlong_penalty(lengths, max_len=24, buffer=8, factor=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5]), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_len=24, buffer=30)
