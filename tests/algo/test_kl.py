import math

import pytest
import torch

from rlhf_ray.algo import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_penalty

LN2 = math.log(2.0)


def test_hand_computed_estimators():
    # Token 0: pi = 0.5, ref = 0.25 (log pi/ref = ln 2). Token 1: pi = 0.25, ref = 0.5.
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]], dtype=torch.float64)
    expected = {
        "k1": [LN2, -LN2],
        "k2": [0.5 * LN2**2, 0.5 * LN2**2],
        "k3": [(0.5 - 1) + LN2, (2.0 - 1) - LN2],  # r = ref / pi
        "abs": [LN2, LN2],
    }
    assert set(KL_ESTIMATORS) == set(expected)
    for kind, values in expected.items():
        assert kl_penalty(logp, ref, kind).tolist()[0] == pytest.approx(values, abs=1e-12), kind


def test_k1_and_k3_are_unbiased_exactly():
    # E_pi[k] summed over the whole support equals KL(pi || ref) for k1 and k3 (Schulman 2020).
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logp = torch.log_softmax(torch.randn(13, generator=g, dtype=torch.float64) * 2, -1)
        ref = torch.log_softmax(torch.randn(13, generator=g, dtype=torch.float64) * 2, -1)
        kl = (logp.exp() * (logp - ref)).sum()
        for kind in ("k1", "k3"):
            expectation = (logp.exp() * kl_penalty(logp, ref, kind)).sum()
            assert expectation.item() == pytest.approx(kl.item(), abs=1e-12), kind


def test_k2_k3_nonnegative_and_k3_finite_for_extreme_ratios():
    logp = torch.tensor([[-100.0, 0.0, -3.0]])
    ref = torch.tensor([[0.0, -100.0, -3.0]])
    for kind in ("k2", "k3"):
        out = kl_penalty(logp, ref, kind)
        assert torch.isfinite(out).all() and (out >= 0).all(), kind
    assert kl_penalty(logp, ref, "k3")[0, 2].item() == 0.0


def test_unknown_kind_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'.*'k1', 'k2', 'k3'"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_fixed_controller_never_moves():
    c = FixedKLController(0.05)
    c.update(100.0, 512)
    assert c.value == 0.05
    d = c.state_dict()
    c2 = FixedKLController(0.3)
    c2.load_state_dict(d)
    assert c2.value == 0.3  # the config decides a fixed coefficient, also on resume


def test_adaptive_controller_hand_computed():
    c = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    c.update(9.0, 256)  # error 0.5 clipped to 0.2
    assert c.value == pytest.approx(0.1 * math.exp(0.2 * 256 / 10000), rel=1e-15)
    c.update(3.0, 256)  # error -0.5 clipped to -0.2 (below the target and moving away from it)
    assert c.value == pytest.approx(0.1, rel=1e-15)
    before = c.value
    c.update(6.6, 100)  # error 0.1, inside the clip
    assert c.value == pytest.approx(before * math.exp(0.1 * 0.01), rel=1e-12)
    before = c.value
    c.update(6.0, 1000)  # on target
    assert c.value == before


def test_adaptive_controller_holds_while_the_kl_moves_towards_the_target():
    c = AdaptiveKLController(init_coef=0.1, target=2.0, horizon=64)
    for kl in (0.0, 0.5, 0.3, 1.5):  # climbing from 0 (noisily): lowering beta would only wind it down
        c.update(kl, 64)
    assert c.value == 0.1
    c.update(3.0, 64)  # reached, above: raise by the clipped error, Ziegler's rule
    c.update(3.0, 64)  # above and not coming back: raise again
    assert c.value == pytest.approx(0.1 * math.exp(0.4))
    c.update(2.5, 64)  # above but falling towards it: hold
    assert c.value == pytest.approx(0.1 * math.exp(0.4))
    c.update(1.5, 64)  # below and still falling, away from it: lower by the proportional error -0.25 -> -0.2
    assert c.value == pytest.approx(0.1 * math.exp(0.2))
    c.update(1.8, 64)  # below, rising towards it: hold
    assert c.value == pytest.approx(0.1 * math.exp(0.2))


def test_adaptive_controller_stays_positive_on_a_short_horizon():
    c = AdaptiveKLController(init_coef=0.1, target=2.0, horizon=8)  # 64 samples / 8: 8x the clipped error
    c.update(2.0, 64)
    c.update(0.0, 64)  # (1 - 0.2 x 8) would make beta negative
    assert c.value == pytest.approx(0.1 * math.exp(-1.6)) and c.value > 0


def test_adaptive_controller_state_round_trip_continues_identically():
    a = AdaptiveKLController(0.2, target=1.0, horizon=50)
    for kl in (3.0, 0.1, 1.7):
        a.update(kl, 8)
    b = AdaptiveKLController(0.2, target=1.0, horizon=50)
    b.load_state_dict(a.state_dict())
    assert (b.value, b.last_kl, b.reached) == (a.value, 1.7, True)
    for kl in (1.2, 0.4, 2.2):  # 1.2 moves towards the target from 1.7: a hold that needs the restored last KL
        a.update(kl, 8)
        b.update(kl, 8)
    assert b.value == a.value


def test_controller_state_kinds_do_not_mix():
    with pytest.raises(ValueError, match="'fixed'.*'adaptive'"):
        AdaptiveKLController(0.1, 6.0, 10).load_state_dict(FixedKLController(0.1).state_dict())


@pytest.mark.parametrize("bad_kl", [math.nan, math.inf])
def test_adaptive_controller_rejects_non_finite_kl(bad_kl):
    c = AdaptiveKLController(0.1, 6.0, 10)
    with pytest.raises(ValueError, match="finite"):
        c.update(bad_kl, 1)
    assert c.value == 0.1


@pytest.mark.parametrize("args", [(0.0, 6.0, 10.0), (0.1, 0.0, 10.0), (0.1, 6.0, 0.0)])
def test_adaptive_controller_rejects_bad_config(args):
    with pytest.raises(ValueError):
        AdaptiveKLController(*args)
