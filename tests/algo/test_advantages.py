"""Advantage estimators: hand-computed cases, slow per-element loop references, and edge cases."""

import pytest
import torch

from rlhf_ray.algo import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    dr_grpo,
    gae,
    grpo,
    masked_whiten,
    reinforce_pp,
    reverse_discounted_cumsum,
    rloo,
)

SEEDS = range(40)


def _ragged_batch(seed, batch=None, t_len=None, dtype=torch.float64):
    """Random rewards and values with junk on padding, right-padded mask with lengths from 0 to T."""
    g = torch.Generator().manual_seed(seed)
    batch = batch or int(torch.randint(1, 9, (1,), generator=g))
    t_len = t_len or int(torch.randint(1, 150, (1,), generator=g))
    lengths = torch.randint(0, t_len + 1, (batch,), generator=g)
    lengths[0] = t_len  # at least one full row
    mask = (torch.arange(t_len) < lengths.unsqueeze(-1)).to(dtype)
    junk = torch.randn(batch, t_len, generator=g, dtype=dtype) * 1e3
    rewards = torch.where(mask.bool(), torch.randn(batch, t_len, generator=g, dtype=dtype), junk)
    values = torch.where(mask.bool(), torch.randn(batch, t_len, generator=g, dtype=dtype), junk)
    return rewards, values, mask


# --------------------------------------------------------------------------------- slow references
def _loop_gae(rewards, values, mask, gamma, lam):
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            next_value = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b, t] = running
            ret[b, t] = running + float(values[b, t])
    return adv, ret


def _loop_sequence_returns(rewards, mask):
    return [sum(float(rewards[b, t]) for t in range(int(mask[b].sum()))) for b in range(rewards.shape[0])]


def _loop_group_advantages(rewards, mask, n, kind, eps=1e-6):
    seq = _loop_sequence_returns(rewards, mask)
    per_row = []
    for i, r in enumerate(seq):
        group = seq[(i // n) * n : (i // n + 1) * n]
        mean = sum(group) / n
        if kind == "grpo":
            std = (sum((x - mean) ** 2 for x in group) / (n - 1)) ** 0.5
            per_row.append((r - mean) / (std + eps))
        elif kind == "dr_grpo":
            per_row.append(r - mean)
        elif kind == "rloo":
            per_row.append(r - (sum(group) - r) / (n - 1))
    return torch.tensor(per_row, dtype=rewards.dtype).unsqueeze(-1) * mask


def _loop_reinforce_pp(rewards, mask, gamma, n=None):
    togo = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        running = 0.0
        for t in reversed(range(int(mask[b].sum()))):
            running = float(rewards[b, t]) + gamma * running
            togo[b, t] = running
    if n is not None:
        seq = _loop_sequence_returns(rewards, mask)
        for b in range(rewards.shape[0]):
            group = seq[(b // n) * n : (b // n + 1) * n]
            togo[b] -= sum(group) / n
    real = [float(togo[b, t]) for b in range(rewards.shape[0]) for t in range(int(mask[b].sum()))]
    mean = sum(real) / len(real)
    var = sum((x - mean) ** 2 for x in real) / max(len(real) - 1, 1)
    return (togo - mean) / (var + 1e-8) ** 0.5 * mask


# --------------------------------------------------------------------------------- scan
@pytest.mark.parametrize("discount", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("block", [2, 3, 8, 64])
def test_reverse_discounted_cumsum_matches_loop(discount, block):
    g = torch.Generator().manual_seed(block)
    x = torch.randn(2, 3, 203, generator=g, dtype=torch.float64)
    expected = torch.zeros_like(x)
    running = torch.zeros(2, 3, dtype=torch.float64)
    for t in reversed(range(203)):
        running = x[..., t] + discount * running
        expected[..., t] = running
    torch.testing.assert_close(reverse_discounted_cumsum(x, discount, block), expected, rtol=0, atol=1e-11)


def test_reverse_discounted_cumsum_gradient():
    x = torch.randn(2, 23, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: reverse_discounted_cumsum(t, 0.9, 4), (x,))


def test_reverse_discounted_cumsum_short_and_empty():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert reverse_discounted_cumsum(x, 0.5).tolist() == [[1.0 + 0.5 * 2 + 0.25 * 3, 2.0 + 0.5 * 3, 3.0]]
    assert reverse_discounted_cumsum(torch.zeros(2, 0), 0.9).shape == (2, 0)
    with pytest.raises(ValueError, match="block must be >= 2"):
        reverse_discounted_cumsum(x, 0.5, block=1)


# --------------------------------------------------------------------------------- GAE
def test_gae_hand_computed():
    # Row 0: full length 3. Row 1: length 2, padding holds junk.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    adv, ret = gae(rewards, mask, values=values, gamma=0.9, lam=0.8)
    # Row 0: deltas 0.04, 0.03, 0.3; A2 = 0.3, A1 = 0.03 + 0.72 * 0.3, A0 = 0.04 + 0.72 * A1.
    # Row 1: deltas -0.1, 1.0 (V after the last token is 0); A1 = 1.0, A0 = -0.1 + 0.72.
    expected_adv = torch.tensor([[0.21712, 0.246, 0.3], [0.62, 1.0, 0.0]], dtype=torch.float64)
    expected_ret = torch.tensor([[0.71712, 0.846, 1.0], [1.62, 2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected_adv, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, expected_ret, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_gae_matches_loop_reference(seed):
    rewards, values, mask = _ragged_batch(seed)
    gamma, lam = [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (1.0, 0.5)][seed % 4]
    adv, ret = gae(rewards, mask, values=values, gamma=gamma, lam=lam, whiten=False)
    ref_adv, ref_ret = _loop_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, rtol=0, atol=1e-10)
    torch.testing.assert_close(ret, ref_ret, rtol=0, atol=1e-10)
    whitened, ret_w = gae(rewards, mask, values=values, gamma=gamma, lam=lam, whiten=True)
    torch.testing.assert_close(whitened, masked_whiten(ref_adv, mask), rtol=0, atol=1e-9)
    torch.testing.assert_close(ret_w, ref_ret, rtol=0, atol=1e-10)


def test_gae_float32_close_to_float64_reference():
    rewards, values, mask = _ragged_batch(7, batch=16, t_len=600)
    adv, ret = gae(rewards.float(), mask.float(), values=values.float(), gamma=0.99, lam=0.95, whiten=False)
    ref_adv, ref_ret = _loop_gae(rewards, values, mask, 0.99, 0.95)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), ref_adv, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ret.double(), ref_ret, rtol=1e-5, atol=1e-4)


def test_gae_needs_values_and_right_padding():
    r, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="values"):
        gae(r, m)
    with pytest.raises(ValueError, match="right-padded"):
        gae(r, torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]), values=r)


# --------------------------------------------------------------------------------- group estimators
# Sequence returns 1, 2, 3 (spread over tokens) and 5, 5, 5 for two prompts of n = 3.
GROUP_REWARDS = torch.tensor(
    [[0.5, 0.5, 0.0], [0.0, 2.0, 7.0], [1.0, 1.0, 1.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [2.0, 3.0, 0.0]],
    dtype=torch.float64,
)
GROUP_MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.float64)


@pytest.mark.parametrize(
    "fn, first_group",
    [
        (grpo, [-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6)]),  # mean 2, unbiased std 1
        (dr_grpo, [-1.0, 0.0, 1.0]),
        (rloo, [1 - 2.5, 2 - 2.0, 3 - 1.5]),  # leave-one-out means 2.5, 2, 1.5
    ],
)
def test_group_estimators_hand_computed(fn, first_group):
    adv, ret = fn(GROUP_REWARDS, GROUP_MASK, group_size=3)
    expected = torch.tensor(first_group + [0.0, 0.0, 0.0], dtype=torch.float64).unsqueeze(-1) * GROUP_MASK
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    assert ret is adv or torch.equal(ret, adv)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("seed", SEEDS)
def test_group_estimators_match_loop_reference(kind, seed):
    n = [2, 3, 4, 8][seed % 4]
    rewards, _, mask = _ragged_batch(seed, batch=n * (1 + seed % 3))
    adv, ret = compute_advantages(kind, rewards, mask, group_size=n)
    expected = _loop_group_advantages(rewards, mask, n, kind)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(ret, expected, rtol=0, atol=1e-10)


def test_grpo_without_std_equals_dr_grpo():
    a, _ = grpo(GROUP_REWARDS, GROUP_MASK, group_size=3, norm_by_std=False)
    b, _ = dr_grpo(GROUP_REWARDS, GROUP_MASK, group_size=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_reject_bad_groups(kind):
    r, m = torch.zeros(6, 2), torch.ones(6, 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        compute_advantages(kind, r, m, group_size=1)
    with pytest.raises(ValueError, match="not a whole number of groups of 4"):
        compute_advantages(kind, r, m, group_size=4)


# --------------------------------------------------------------------------------- REINFORCE++
def test_reinforce_pp_hand_computed():
    # Returns-to-go on real tokens: 1, 1 | 2; mean 4/3, unbiased var 1/3.
    rewards = torch.tensor([[0.0, 1.0], [2.0, 8.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.float64)
    adv, ret = reinforce_pp(rewards, mask)
    std = (1 / 3 + 1e-8) ** 0.5
    expected = torch.tensor([[-1 / 3, -1 / 3], [2 / 3, 0.0]], dtype=torch.float64) / std
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    assert torch.equal(ret, adv)


@pytest.mark.parametrize("seed", SEEDS)
def test_reinforce_pp_matches_loop_reference(seed):
    rewards, _, mask = _ragged_batch(seed, batch=4 * (1 + seed % 2))
    gamma = [1.0, 0.99, 0.5][seed % 3]
    adv, _ = reinforce_pp(rewards, mask, gamma=gamma)
    torch.testing.assert_close(adv, _loop_reinforce_pp(rewards, mask, gamma), rtol=0, atol=1e-9)
    adv_b, _ = reinforce_pp(rewards, mask, gamma=gamma, group_size=4, baseline="group_mean")
    torch.testing.assert_close(adv_b, _loop_reinforce_pp(rewards, mask, gamma, n=4), rtol=0, atol=1e-9)


def test_reinforce_pp_baseline_options():
    r, m = torch.zeros(4, 2), torch.ones(4, 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        reinforce_pp(r, m, baseline="group_mean")
    with pytest.raises(ValueError, match="unknown baseline 'median'"):
        reinforce_pp(r, m, group_size=2, baseline="median")


# --------------------------------------------------------------------------------- registry and edge cases
def test_registry_names_and_dispatch():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"}
    a, _ = compute_advantages("rloo", GROUP_REWARDS, GROUP_MASK, group_size=3, gamma=0.9, lam=0.5)
    b, _ = rloo(GROUP_REWARDS, GROUP_MASK, group_size=3)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'.*'dr_grpo', 'gae', 'grpo'"):
        compute_advantages("ppo", GROUP_REWARDS, GROUP_MASK)


def test_misspelt_option_is_an_error_not_ignored():
    with pytest.raises(TypeError, match="norm_by_stdd"):
        compute_advantages("grpo", GROUP_REWARDS, GROUP_MASK, group_size=3, norm_by_stdd=False)


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_identical_rewards_and_empty_rows_give_zero_not_nan(name):
    # Two prompts of n = 2: identical returns within each group; row 3 has no tokens at all.
    rewards = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    values = torch.zeros(4, 2)
    adv, ret = compute_advantages(name, rewards, mask, values=values, group_size=2)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert (adv[3] == 0).all() and (ret[3] == 0).all()
    if name in ("grpo", "dr_grpo", "rloo"):
        assert (adv[:2] == 0).all()

    empty = torch.zeros(4, 2)
    adv, ret = compute_advantages(name, rewards, empty, values=values, group_size=2)
    assert (adv == 0).all() and (ret == 0).all()
