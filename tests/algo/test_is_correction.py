"""Each train/inference mismatch preset corrects a known mismatch, and the case fails without it.

The case: a four-armed bandit (one-token responses) whose arms are each sampled once by a generator mu that is
uniform (so one row per arm is the exact expectation under mu), scored by a learner pi that differs from mu.
Weighted by pi/mu the batch's policy gradient is the exact on-policy gradient of E_pi[A]; unweighted it is
E_mu's. The masking presets also get a fifth row the generator claims it sampled with probability 1e-4 (a
broken engine's token): the preset drops it, so the gradient is the same exact one scaled by 4/5 rows. On
whole sequences of two tokens only the sequence-level ratio (mis) is exact.
"""
import math

import pytest
import torch

from rlhf_ray.algo import is_correction_weights, policy_loss

THETA = torch.tensor([0.3, -0.2, 0.1, 0.4])   # the learner's logits; pi/mu within [0.66, 1.2]
ADV = torch.tensor([1.0, -0.5, 0.3, 2.0])


def _exact_gradient(theta=THETA, seqs=None) -> torch.Tensor:
    """grad of E_pi[A] = sum_y pi(y) A(y), by enumeration (one- or two-token responses)."""
    th = theta.clone().requires_grad_()
    p = torch.softmax(th, -1)
    if seqs is None:
        value = (p * ADV).sum()
    else:
        value = sum(p[0, a] * p[1, b] * ADV[i] for i, (a, b) in enumerate(seqs))
    return torch.autograd.grad(value, th)[0]


def _gradient(kind: str, broken: bool = False, theta=THETA, seqs=None) -> torch.Tensor:
    """The negative gradient of the PPO loss at ratio 1 (one step from the proximal policy) with the preset's
    weights: (1/B) sum over rows of sum_t w_t A grad log pi(y_t) (token sums, norm 1, mean over rows)."""
    th = theta.clone().requires_grad_()
    lp = torch.log_softmax(th, -1)
    adv = ADV.tolist()
    if seqs is None:
        rows = [[a] for a in range(4)] + ([[0]] if broken else [])
        logp = torch.stack([lp[a] for (a,) in rows])[:, None]                    # (B, 1)
        mu = torch.full_like(logp, math.log(0.25))
        adv = adv + ([5.0] if broken else [])
    else:
        logp = torch.stack([torch.stack([lp[0, a], lp[1, b]]) for a, b in seqs])  # (B, 2)
        mu = torch.full_like(logp, math.log(0.5))
    if broken:
        mu[-1] = math.log(1e-4)
    mask = torch.ones_like(logp)
    adv_t = torch.tensor(adv)[:, None].expand_as(logp)
    w, _ = is_correction_weights(kind, logp.detach(), mu, mask, cap=2.0)
    loss, _ = policy_loss(logp, logp.detach(), adv_t, mask, clip_low=0.2, clip_high=0.2,
                          agg="seq-mean-token-sum-norm", norm_len=1, is_weights=w)
    return -torch.autograd.grad(loss, th)[0]


@pytest.mark.parametrize("kind", ["tis", "mis", "icepop", "seq_mask_tis"])
def test_the_preset_turns_the_generators_batch_into_the_learners_gradient(kind):
    exact = _exact_gradient()
    assert not torch.allclose(_gradient("none"), exact, atol=1e-3)   # the mismatch is real
    assert torch.allclose(_gradient(kind), exact, atol=1e-6)


@pytest.mark.parametrize("kind", ["mis", "icepop", "seq_mask_tis"])
def test_the_masking_presets_drop_a_broken_engines_sample(kind):
    exact = _exact_gradient() * 4 / 5
    assert not torch.allclose(_gradient("none", broken=True), exact, atol=1e-3)
    assert not torch.allclose(_gradient("tis", broken=True), exact, atol=1e-3)  # truncation keeps C times its gradient
    assert torch.allclose(_gradient(kind, broken=True), exact, atol=1e-6)


def test_on_whole_sequences_only_the_sequence_ratio_is_exact():
    # two tokens per response, the generator uniform at both; four sequences, one row each
    seqs = [(0, 0), (0, 1), (1, 0), (1, 1)]
    theta = torch.tensor([[0.3, -0.2], [0.1, 0.4]])  # sequence ratios 0.56 .. 1.42, below C = 2
    exact = _exact_gradient(theta, seqs)
    assert torch.allclose(_gradient("mis", theta=theta, seqs=seqs), exact, atol=1e-6)
    assert not torch.allclose(_gradient("tis", theta=theta, seqs=seqs), exact, atol=1e-3)  # per-token: biased
    assert not torch.allclose(_gradient("none", theta=theta, seqs=seqs), exact, atol=1e-3)


def test_each_presets_weights_by_hand():
    # one sequence of three tokens, log-ratios (log 3, 0, log 0.25): token ratios 3, 1, 0.25; product 0.75;
    # geometric mean 0.75^(1/3) = 0.9086; a second sequence with log-ratios (log 8, log 8): product 64, g = 8
    prox = torch.tensor([[math.log(3), 0.0, math.log(0.25)], [math.log(8), math.log(8), 0.0]])
    mu = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    cases = {
        "tis": [[2.0, 1.0, 0.25], [2.0, 2.0, 0.0]],
        "mis": [[0.75, 0.75, 0.75], [0.0, 0.0, 0.0]],                 # 64 > C = 2: the sequence is dropped
        "icepop": [[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]],                 # band [0.5, 5]: 0.25 and 8 are dropped
        "seq_mask_tis": [[2.0, 1.0, 0.25], [0.0, 0.0, 0.0]],          # g = 8 outside [0.5, 2]: dropped
    }
    for kind, expected in cases.items():
        w, stats = is_correction_weights(kind, prox, mu, mask, cap=2.0)
        assert torch.allclose(w, torch.tensor(expected), atol=1e-6), (kind, w)
        assert stats["is/token_ratio_max"] == pytest.approx(8.0)
        assert stats["is/seq_ratio_min"] == pytest.approx(0.75 ** (1 / 3)) and stats["is/seq_ratio_max"] == pytest.approx(8)
    assert is_correction_weights("icepop", prox, mu, mask)[1]["is/masked_frac"] == pytest.approx(3 / 5)
    assert is_correction_weights("none", prox, mu, mask) == (None, {})
    with pytest.raises(ValueError, match="allowed"):
        is_correction_weights("clip", prox, mu, mask)
