"""GSPO and CISPO: hand-computed small cases, a slow loop reference each, and their registry entries."""
import math

import pytest
import torch

from rlhf_ray.algo import OBJECTIVES, cispo_loss, get_algorithm, gspo_loss, sequence_log_ratio


def test_gspo_clips_the_length_normalised_sequence_ratio_by_hand():
    # row 0: log-ratios 0.1, 0.2, 0.3 -> s_0 = e^0.2 = 1.2214 > 1 + 4e-4, A = +1: clipped, no gradient.
    # row 1: log-ratios -1e-4, +1e-4 (and padding) -> s_1 = 1, A = -1: inside, loss s_1, gradient s_1/|y_1| per token.
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.2, 0.3], [-1e-4, 1e-4, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    adv = torch.tensor([[1.0, 1, 1], [-1, -1, 0]])
    loss, stats = gspo_loss(logp, old, adv, mask)  # the paper's 3e-4 / 4e-4, seq-mean-token-mean
    assert sequence_log_ratio(logp, old, mask).tolist() == pytest.approx([0.2, 0.0], abs=1e-7)
    # 1/G sum_i max(-A_i s_i, -A_i clip(s_i)) = ( -1.0004 + 1 ) / 2
    assert float(loss.detach()) == pytest.approx((-(1 + 4e-4) + 1.0) / 2, abs=1e-6)
    loss.backward()
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.25, 0.0]])  # s_1 * (1/|y_1|) * (1/G)
    assert torch.allclose(logp.grad, expected, atol=1e-6), logp.grad
    assert stats["policy/clip_frac"] == pytest.approx(0.5)
    assert stats["policy/ratio_max"] == pytest.approx(math.exp(0.2), rel=1e-6)
    assert stats["policy/ratio_min"] == pytest.approx(1.0, abs=1e-6)


def _gspo_loop(logp, old, adv, mask, lo, hi):
    """GSPO eq. 5 with Python floats: one ratio and one advantage per sequence, mean over sequences."""
    total, rows = 0.0, 0
    for i in range(logp.shape[0]):
        toks = [t for t in range(logp.shape[1]) if mask[i, t] > 0]
        if not toks:
            continue
        s = math.exp(sum(float(logp[i, t] - old[i, t]) for t in toks) / len(toks))
        a = float(adv[i, toks[0]])
        total += max(-a * s, -a * min(max(s, 1 - lo), 1 + hi))
        rows += 1
    return total / rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_matches_a_slow_loop(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 7
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * 0.05
    mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=g)).float()
    adv = torch.randn(B, 1, generator=g).expand(B, T) * mask
    loss, _ = gspo_loss(logp, old, adv, mask, clip_low=0.01, clip_high=0.02)
    assert float(loss.detach()) == pytest.approx(_gspo_loop(logp, old, adv, mask, 0.01, 0.02), rel=1e-5, abs=1e-7)


def test_gspo_gradient_is_the_sequence_ratio_times_the_mean_score_function():
    # Zheng 2025 eq. 10: grad = A_i s_i (1/|y_i|) sum_t grad log pi(y_i,t), for an unclipped sequence
    old = torch.tensor([[-1.0, -2.0, -0.5, -0.7]])
    logp = (old + torch.tensor([[1e-4, -2e-4, 1e-4, 0.0]])).requires_grad_()
    mask = torch.tensor([[1.0, 1, 1, 0]])
    adv = torch.full((1, 4), 2.0)
    loss, stats = gspo_loss(logp, old, adv, mask)
    loss.backward()
    s = math.exp(0.0)
    assert stats["policy/clip_frac"] == 0.0
    assert torch.allclose(logp.grad, torch.tensor([[-2 * s / 3] * 3 + [0.0]]), atol=1e-6)


def test_cispo_weights_log_pi_by_the_clipped_ratio_without_a_lower_bound_by_hand():
    # ratios 0.5, 1, 2 -> weights 0.5 (no lower bound), 1, 1.28 (upper bound 1 + 0.28)
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = logp.detach() - torch.tensor([[math.log(0.5), 0.0, math.log(2.0)]])
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, stats = cispo_loss(logp, old, adv, mask)  # MiniMax-M1's: no lower bound; 0.28
    # -w A log pi per token: 0.5, 2.0, -0.64; token mean
    assert float(loss.detach()) == pytest.approx((0.5 + 2.0 - 0.64) / 3, abs=1e-6)
    loss.backward()
    # the weight is a constant (stop-gradient): d/dlogp = -w A / N, also for the clipped token
    assert torch.allclose(logp.grad, torch.tensor([[-0.5 / 3, -1 / 3, 1.28 / 3]]), atol=1e-6)
    assert stats["policy/clip_frac"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_cispo_matches_a_slow_loop_and_keeps_every_tokens_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 5
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + torch.randn(B, T, generator=g) * 0.5).requires_grad_()
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    adv = torch.randn(B, T, generator=g)
    loss, _ = cispo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    total, n = 0.0, 0
    for i in range(B):
        for t in range(T):
            if mask[i, t] > 0:
                w = min(max(math.exp(float(logp[i, t].detach() - old[i, t])), 0.8), 1.28)
                total += -w * float(adv[i, t]) * float(logp[i, t].detach())
                n += 1
    assert float(loss.detach()) == pytest.approx(total / n, rel=1e-5)
    loss.backward()
    # unlike PPO's clip, no real token with a non-zero advantage loses its gradient
    assert bool((logp.grad[mask.bool()] != 0).all())


def test_gspo_and_cispo_refuse_a_dual_clip():
    x = torch.zeros(1, 2)
    for fn in (gspo_loss, cispo_loss):
        with pytest.raises(ValueError, match="dual clip"):
            fn(x, x, x, torch.ones(1, 2), dual_clip=3.0)


def test_the_registry_carries_each_papers_defaults_into_the_config():
    from rlhf_ray.config import load_config
    from rlhf_ray.config.load import ConfigError
    assert {get_algorithm(n).objective for n in ("gspo", "cispo")} <= set(OBJECTIVES)
    a = load_config(None, ["algorithm.name=gspo"]).algorithm
    assert (a.clip_low, a.clip_high, a.loss_agg) == (3e-4, 4e-4, "seq-mean-token-mean")  # Zheng 2025
    a = load_config(None, ["algorithm.name=cispo"]).algorithm
    assert (a.clip_low, a.clip_high, a.loss_agg) == (1.0, 0.28, "token-mean")           # MiniMax-M1
    assert load_config(None, ["algorithm.name=cispo", "algorithm.clip_high=2.0"]).algorithm.clip_high == 2.0
    with pytest.raises(ConfigError, match="algorithm.dual_clip"):
        load_config(None, ["algorithm.name=gspo", "algorithm.dual_clip=3"])
