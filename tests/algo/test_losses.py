import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_ray.algo import (
    AGGREGATIONS,
    aggregate,
    bradley_terry_loss,
    dpo_loss,
    entropy_bonus,
    kl_loss,
    kl_penalty,
    policy_loss,
    sft_loss,
    value_loss,
)


def _softplus(x):  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


# --------------------------------------------------------------------------------- aggregate
LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0, 50.0], [4.0, 60.0, 70.0, 80.0], [9.0, 9.0, 9.0, 9.0]])
AGG_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_aggregate_hand_computed():
    assert set(AGGREGATIONS) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"}
    assert aggregate(LOSS_MAT, AGG_MASK, "token-mean").item() == pytest.approx(10 / 4)
    # Row means 2 and 4; the empty row is left out.
    assert aggregate(LOSS_MAT, AGG_MASK, "seq-mean-token-mean").item() == pytest.approx(3.0)
    # Row sums 6, 4, 0 over a constant length, mean over all three rows.
    assert aggregate(LOSS_MAT, AGG_MASK, "seq-mean-token-sum-norm").item() == pytest.approx(10 / 4 / 3)
    assert aggregate(LOSS_MAT, AGG_MASK, "seq-mean-token-sum-norm", norm_len=10).item() == pytest.approx(10 / 30)


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_aggregate_empty_mask_is_zero(mode):
    assert aggregate(LOSS_MAT, torch.zeros(3, 4), mode).item() == 0.0


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError, match=r"unknown loss aggregation 'mean'.*'seq-mean-token-mean'"):
        aggregate(LOSS_MAT, AGG_MASK, "mean")


# --------------------------------------------------------------------------------- PPO policy loss
RATIOS = torch.tensor([[1.5, 0.5, 1.1, 0.7]], dtype=torch.float64)
ADV = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)


def _logps(ratios):
    old = torch.full_like(ratios, -1.3)
    return (old + ratios.log()).requires_grad_(True), old


def test_policy_loss_hand_computed():
    logp, old = _logps(RATIOS)
    loss, stats = policy_loss(logp, old, ADV, torch.ones_like(ADV))
    # Per token: max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5, 1.1, max(0.7, 0.8) = 0.8 (clipped).
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4, abs=1e-12)
    loss.backward()
    # d/dlogp of -A r is -A r on unclipped tokens, 0 where the clipped branch wins.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5, 1.1, 0.0]], dtype=torch.float64) / 4)
    assert stats["policy/loss"] == pytest.approx(0.05, abs=1e-12)
    assert stats["policy/clip_frac"] == pytest.approx(0.75)
    assert stats["policy/ratio_min"] == pytest.approx(0.5)
    assert stats["policy/ratio_max"] == pytest.approx(1.5)
    assert stats["policy/ratio_mean"] == pytest.approx(0.95)
    k3 = sum(r - 1 - math.log(r) for r in RATIOS[0].tolist()) / 4
    assert stats["policy/approx_kl"] == pytest.approx(k3, abs=1e-12)
    assert "policy/dual_clip_frac" not in stats
    assert all(isinstance(v, float) for v in stats.values())


def test_policy_loss_asymmetric_clip():
    logp, old = _logps(torch.tensor([[1.25, 0.7]], dtype=torch.float64))
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    # clip_high 0.28 leaves 1.25 unclipped; clip_low 0.2 still caps the second token at 0.8.
    loss, _ = policy_loss(logp, old, adv, torch.ones_like(adv), clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.25 + 0.8) / 2, abs=1e-12)
    loss, _ = policy_loss(logp, old, adv, torch.ones_like(adv))
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2, abs=1e-12)


def test_policy_loss_dual_clip():
    logp, old = _logps(torch.tensor([[5.0, 5.0, 2.0]], dtype=torch.float64))
    adv = torch.tensor([[-1.0, 1.0, -2.0]], dtype=torch.float64)
    loss, stats = policy_loss(logp, old, adv, torch.ones_like(adv), dual_clip=3.0)
    # Token 0: max(5, 1.2) = 5, capped at 3. Token 1: positive advantage, -1.2. Token 2: max(4, 2.4) = 4 < 6.
    assert loss.item() == pytest.approx((3.0 - 1.2 + 4.0) / 3, abs=1e-12)
    assert stats["policy/dual_clip_frac"] == pytest.approx(1 / 3)
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(logp, old, adv, torch.ones_like(adv), dual_clip=1.0)


def test_policy_loss_ignores_padding_and_empty_batch_is_finite():
    logp, old = _logps(torch.tensor([[1.0, 1e6]], dtype=torch.float64))
    adv = torch.tensor([[2.0, 1e9]], dtype=torch.float64)
    loss, stats = policy_loss(logp, old, adv, torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(-2.0)
    assert stats["policy/ratio_max"] == pytest.approx(1.0)
    loss, stats = policy_loss(logp, old, adv, torch.zeros(1, 2))
    assert loss.item() == 0.0 and all(math.isfinite(v) for v in stats.values())


def test_policy_loss_agg_is_forwarded():
    logp, old = _logps(torch.ones(2, 3, dtype=torch.float64))
    adv = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # At ratio 1 the loss matrix is -A.
    assert policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean")[0].item() == pytest.approx(-2.5)
    loss, _ = policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum-norm", norm_len=6)
    assert loss.item() == pytest.approx(-(3 / 6 + 4 / 6) / 2)


# --------------------------------------------------------------------------------- value, entropy, KL
def test_value_loss_hand_computed():
    values = torch.tensor([[1.5, 0.9]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    mask = torch.ones(1, 2)
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    # Token 0: max(0.25, (1.2 - 2)^2 = 0.64). Token 1: 0.81 (inside the clip).
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2, abs=1e-12)
    assert stats["value/clip_frac"] == pytest.approx(0.5)
    # Residuals 0.5, -0.9 (unbiased var 0.98); returns 2, 0 (var 2).
    assert stats["value/explained_var"] == pytest.approx(1 - 0.98 / 2, abs=1e-12)
    assert stats["value/mean"] == pytest.approx(1.2)
    loss.backward()
    assert values.grad[0, 0].item() == 0.0  # clipped branch wins: no gradient
    unclipped, _ = value_loss(values, old, returns, mask, clip=None)
    assert unclipped.item() == pytest.approx(0.5 * (0.25 + 0.81) / 2, abs=1e-12)


def test_entropy_bonus():
    entropy = torch.tensor([[1.0, 2.0], [3.0, 9.0]], requires_grad=True)
    loss, stats = entropy_bonus(entropy, torch.tensor([[1.0, 1.0], [1.0, 0.0]]), coef=0.01)
    assert loss.item() == pytest.approx(-0.02)
    assert stats == {"policy/entropy": pytest.approx(2.0)}


def test_kl_loss_matches_estimator_and_gets_gradient():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    ref = torch.randn(3, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    loss, stats = kl_loss(logp, ref, mask, coef=0.04)
    expected = (kl_penalty(logp, ref, "k3") * mask).sum() / 6
    assert loss.item() == pytest.approx(0.04 * expected.item(), abs=1e-12)
    assert stats["kl/loss"] == pytest.approx(expected.item(), abs=1e-12)
    loss.backward()
    assert (logp.grad[2] == 0).all() and (logp.grad[0] != 0).all()


def test_kl_loss_k2_gradient_is_the_kl_gradient_and_k1_is_refused():
    # Over the whole support weighted by pi (an exact expectation), grad of k2 equals grad KL(pi || ref).
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(1, 9, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(1, 9, generator=g, dtype=torch.float64), -1)
    logp = torch.log_softmax(theta, -1)
    weights = logp.detach().exp()  # pi(a) as a fixed sampling weight
    k2, _ = kl_loss(logp, ref, weights, coef=1.0, kind="k2", agg="seq-mean-token-sum-norm", norm_len=1)
    (grad_k2,) = torch.autograd.grad(k2, theta)
    logp = torch.log_softmax(theta, -1)
    (grad_kl,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta)
    torch.testing.assert_close(grad_k2, grad_kl, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="zero expected gradient"):
        kl_loss(logp, ref, weights, coef=1.0, kind="k1")


# --------------------------------------------------------------------------------- preference and SFT
def test_bradley_terry_hand_computed():
    chosen = torch.tensor([2.0, 0.0], dtype=torch.float64)
    rejected = torch.tensor([1.0, 1.0], dtype=torch.float64)
    loss, stats = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx((_softplus(-1.0) + _softplus(1.0)) / 2, abs=1e-12)
    assert stats["rm/accuracy"] == 0.5
    assert stats["rm/margin"] == 0.0
    assert stats["rm/chosen_mean"] == 1.0 and stats["rm/rejected_mean"] == 1.0
    loss_m, _ = bradley_terry_loss(chosen, rejected, margin=0.5)
    assert loss_m.item() == pytest.approx((_softplus(-0.5) + _softplus(1.5)) / 2, abs=1e-12)
    loss_t, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert loss_t.item() == pytest.approx((_softplus(-0.5) + _softplus(1.0)) / 2, abs=1e-12)


def test_dpo_hand_computed():
    loss, stats = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.1
    )
    # Implicit rewards 0.1 * 0.5 and 0.1 * -0.5, margin 0.1.
    assert loss.item() == pytest.approx(_softplus(-0.1), abs=1e-6)
    assert stats["dpo/reward_chosen"] == pytest.approx(0.05)
    assert stats["dpo/reward_rejected"] == pytest.approx(-0.05)
    assert stats["dpo/reward_margin"] == pytest.approx(0.1)
    assert stats["dpo/reward_acc"] == 1.0


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-3.0, -1.0], requires_grad=True)
    pr = torch.tensor([-2.0, -4.0], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0]), beta=0.5)
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)  # policy == reference
    loss.backward()
    # d/dpc of -log sigmoid(beta m) at m = 0 is -beta / 2 per pair, over 2 pairs.
    torch.testing.assert_close(pc.grad, torch.full((2,), -0.125))
    torch.testing.assert_close(pr.grad, torch.full((2,), 0.125))


def test_sft_loss_matches_cross_entropy_on_response_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 17, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 17, (3, 5), generator=g)
    loss_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    labels = torch.where(loss_mask.bool(), labels, -100)  # placeholders must never be read
    loss, stats = sft_loss(logits, labels, loss_mask)
    expected = F.cross_entropy(logits.reshape(-1, 17), labels.reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert stats["sft/tokens"] == 5.0
