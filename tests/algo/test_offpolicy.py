"""Truncated importance sampling: hand-computed weights, and the gradient it corrects."""
import math

import pytest
import torch

from rlhf_ray.algo import is_correction_weights, policy_loss


def test_weights_hand_computed_and_truncated():
    prox = torch.log(torch.tensor([[0.2, 0.3, 0.9], [0.5, 0.5, 0.5]], dtype=torch.float64))
    behaviour = torch.log(torch.tensor([[0.1, 0.3, 0.3], [0.5, 1.0, 0.5]], dtype=torch.float64))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    w, stats = is_correction_weights("tis", prox, behaviour, mask, cap=2.5)
    # ratios 2, 1, 3 (-> 2.5), 1, 0.5; the padded token gets 0
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 2.5], [1.0, 0.5, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert stats["is/token_ratio_max"] == pytest.approx(3.0) and stats["is/token_ratio_min"] == pytest.approx(0.5)
    assert stats["is/token_ratio_mean"] == pytest.approx(7.5 / 5)
    assert stats["is/truncated_frac"] == pytest.approx(1 / 5)
    assert stats["is/weight_mean"] == pytest.approx(7.0 / 5)
    with pytest.raises(ValueError, match=">= 1"):
        is_correction_weights("tis", prox, behaviour, mask, cap=0.5)


def _bandit_gradient(use_tis: bool, cap: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4-armed bandit sampled by a stale policy mu = [.1, .2, .3, .4] while the learner is at
    pi = [.2, .3, .3, .2]. Rows hold the actions in exact proportion to mu (1, 2, 3, 4 of 10), so the
    token-mean of the loss IS the expectation under mu, no sampling noise. Returns (grad, true grad)."""
    pi = torch.tensor([0.2, 0.3, 0.3, 0.2], dtype=torch.float64)
    mu = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    reward = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)
    theta = pi.log().clone().requires_grad_(True)
    actions = torch.tensor([0] + [1] * 2 + [2] * 3 + [3] * 4)
    logp = torch.log_softmax(theta, -1)[actions].unsqueeze(1)  # (10, 1)
    mask = torch.ones_like(logp)
    adv = reward[actions].unsqueeze(1)
    weights = (is_correction_weights("tis", logp.detach(), mu.log()[actions].unsqueeze(1), mask, cap=cap)[0]
               if use_tis else None)
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, is_weights=weights)
    (grad,) = torch.autograd.grad(loss, theta)
    # gradient ascent direction on E_pi[r]: sum_a pi(a) r(a) grad log pi(a)
    probs = torch.softmax(theta, -1)
    (true,) = torch.autograd.grad(-(probs * reward).sum(), theta)
    return grad, true


def test_tis_makes_the_off_policy_gradient_the_on_policy_one():
    grad, true = _bandit_gradient(use_tis=True)
    torch.testing.assert_close(grad, true, rtol=0, atol=1e-12)  # ratios <= cap: unbiased, exactly


def test_without_tis_the_stale_samples_bias_the_gradient():
    grad, true = _bandit_gradient(use_tis=False)
    assert (grad - true).abs().max() > 0.05
    cos = torch.nn.functional.cosine_similarity(grad, true, dim=0)
    assert cos < 0.99, float(cos)


def test_policy_loss_scales_each_token_by_its_weight():
    logp = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    adv = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    loss, _ = policy_loss(logp, logp, adv, mask, is_weights=torch.tensor([[2.0, 0.0]], dtype=torch.float64))
    assert loss.item() == pytest.approx(-(2.0 + 0.0) / 2)
    assert math.isfinite(loss.item())
