import math

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.rl.advantage_step import BadRewardError, clean_scores, make_train_batch
from rlhf_ray.batch import pack_sequences
from rlhf_ray.records import ScoredBatch


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
    return ScoredBatch(seq, z, z, torch.tensor(scores), None, group, 0, ["p"] * len(scores), ["r"] * len(scores), {})


def test_grpo_batch_advantages_are_group_normalised_per_sequence():
    cfg = load_config(None, ["algorithm.name=grpo", "reference.kl_coef=0"])
    tb, stats = make_train_batch(_scored([1.0, 0.0, 3.0, 3.0], 2), cfg.algorithm, cfg.reference, 0.0)
    a = tb.advantages
    # group 1: rewards 1, 0 -> +-(0.5 / std 0.7071) ; group 2 identical -> 0
    assert a[0, 0].item() == pytest.approx(0.70710, abs=1e-4) and a[0, 1].item() == pytest.approx(0.70710, abs=1e-4)
    assert a[1, 0].item() == pytest.approx(-0.70710, abs=1e-4) and a[1, 1].item() == 0.0  # padding
    assert torch.all(a[2:] == 0)
    assert stats["response/len_mean"] == 1.5


# -- the algorithm registry drives the step ----------------------------------------------------------
from rlhf_ray import algo  # noqa: E402
from rlhf_ray.algo import ALGORITHMS  # noqa: E402
from rlhf_ray.config import AlgorithmConfig  # noqa: E402
from rlhf_ray.config.schema import AlgorithmName  # noqa: E402
from typing import get_args  # noqa: E402


def test_config_names_are_the_registry_names():
    assert set(get_args(AlgorithmName)) == set(ALGORITHMS)


@pytest.mark.parametrize("name,agg,in_reward,kind", [
    ("ppo", "token-mean", True, "k1"), ("grpo", "seq-mean-token-mean", False, "k3"),
    ("dr_grpo", "seq-mean-token-sum-norm", False, "k3"), ("rloo", "token-mean", True, "k1"),
    ("reinforce_pp", "token-mean", True, "k1"), ("dapo", "token-mean", False, "k3")])
def test_each_algorithm_brings_its_defaults_and_explicit_keys_win(name, agg, in_reward, kind):
    cfg = load_config(None, [f"algorithm.name={name}"])
    assert (cfg.algorithm.loss_agg, cfg.reference.kl_in_reward, cfg.reference.kl_kind) == (agg, in_reward, kind)
    cfg = load_config(None, [f"algorithm.name={name}", "algorithm.loss_agg=token-mean", "reference.kl_kind=k2",
                             "reference.kl_in_reward=false"])
    assert (cfg.algorithm.loss_agg, cfg.reference.kl_in_reward, cfg.reference.kl_kind) == ("token-mean", False, "k2")


SMALL = ["rollout.n_samples_per_prompt=2", "rl.prompts_per_step=2", "algorithm.mini_batch_size=2"]


def _batch4(scores, values=None):
    seq = pack_sequences([[1]] * 4, [[2, 3, 4], [2], [4, 5], [6, 6, 6]], pad_id=0)
    logp = torch.full((4, 3), -1.0) * seq.response_mask
    ref = torch.full((4, 3), -1.2) * seq.response_mask
    return ScoredBatch(seq, logp, ref, torch.tensor(scores), values, 2, 0, ["p"] * len(scores), ["r"] * len(scores), {})


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_make_train_batch_runs_the_registered_estimator(name):
    # no overlong penalty (dapo's default; it has its own test): the estimator alone is compared
    cfg = load_config(None, [f"algorithm.name={name}", "rollout.n_samples_per_prompt=2", "rl.prompts_per_step=2",
                             "algorithm.mini_batch_size=2", "algorithm.overlong_buffer=0"])
    values = torch.full((4, 3), 0.25) if name == "ppo" else None
    scored = _batch4([1.0, -1.0, 0.5, 3.0], values)
    tb, _ = make_train_batch(scored, cfg.algorithm, cfg.reference, 0.1)
    mask = scored.seq.response_mask
    rewards, _ = algo.shape_rewards(scored.scores, scored.old_logp, scored.ref_logp, mask, 0.1,
                                    kl_kind=cfg.reference.kl_kind, kl_in_reward=cfg.reference.kl_in_reward)
    spec = ALGORITHMS[name]
    extra = {"values": values} if spec.uses_critic else {}
    adv, ret = algo.compute_advantages(spec.estimator, rewards, mask, group_size=2, gamma=cfg.algorithm.gamma,
                                       lam=cfg.algorithm.lam, **algo.estimator_kwargs(spec, cfg.algorithm), **extra)
    if spec.batch_whiten:
        adv = algo.masked_whiten(adv, mask) * mask
    torch.testing.assert_close(tb.advantages, adv, rtol=0, atol=0)
    torch.testing.assert_close(tb.returns, ret, rtol=0, atol=0)


def test_reinforce_pp_group_baseline_is_a_config_key():
    base = load_config(None, ["algorithm.name=reinforce_pp", *SMALL])
    with_b = load_config(None, ["algorithm.name=reinforce_pp", "algorithm.baseline=group_mean", *SMALL])
    scored = _batch4([1.0, 0.0, 5.0, 6.0])
    a0, _ = make_train_batch(scored, base.algorithm, base.reference, 0.0)
    a1, _ = make_train_batch(scored, with_b.algorithm, with_b.reference, 0.0)
    mask = scored.seq.response_mask
    want, _ = algo.reinforce_pp(algo.shape_rewards(scored.scores, scored.old_logp, scored.ref_logp, mask, 0.0)[0],
                                mask, group_size=2, baseline="group_mean")
    torch.testing.assert_close(a1.advantages, want, rtol=0, atol=0)
    # without the baseline the high-reward prompt's samples all look good; with it, only the better one
    assert a0.advantages[3, 0] > 0 and a0.advantages[2, 0] > 0
    assert a1.advantages[2, 0] < 0 < a1.advantages[3, 0]
    with pytest.raises(Exception, match="algorithm.baseline=group_mean applies to algorithm.name=reinforce_pp"):
        load_config(None, ["algorithm.name=rloo", "algorithm.baseline=group_mean"])
    with pytest.raises(Exception, match="needs rollout.n_samples_per_prompt >= 2"):
        load_config(None, ["algorithm.name=reinforce_pp", "algorithm.baseline=group_mean",
                           "rollout.n_samples_per_prompt=1", "algorithm.mini_batch_size=8"])


def test_overlong_penalty_lowers_responses_in_the_buffer_zone():
    on = load_config(None, ["algorithm.name=rloo", "algorithm.overlong_buffer=2", "rollout.max_new_tokens=3", *SMALL])
    off = load_config(None, ["algorithm.name=rloo", "rollout.max_new_tokens=3", *SMALL])
    scored = _batch4([1.0, 1.0, 1.0, 1.0])  # equal scores: only the penalty separates the samples
    tb_off, _ = make_train_batch(scored, off.algorithm, off.reference, 0.0, max_new_tokens=3)
    tb_on, st = make_train_batch(scored, on.algorithm, on.reference, 0.0, max_new_tokens=3)
    assert torch.all(tb_off.advantages == 0)
    # lengths 3, 1 | 2, 3: free up to 1 token, then -(len - 1) / 2 -> -1, 0 | -0.5, -1
    assert st["reward/overlong_penalty_mean"] == pytest.approx(-2.5 / 4)
    assert tb_on.advantages[0, 0] < 0 < tb_on.advantages[1, 0]  # the capped response loses to the short one
    assert tb_on.advantages[3, 0] < 0 < tb_on.advantages[2, 0]
    with pytest.raises(Exception, match="overlong_buffer=30 exceeds rollout.max_new_tokens"):
        load_config(None, ["algorithm.overlong_buffer=30"])


def test_is_correction_auto_is_tis_when_rollouts_may_lag_and_algorithm_tis_stays_an_alias():
    ic = lambda *o: load_config(None, list(o)).algorithm.is_correction  # noqa: E731
    assert ic() == "none"
    assert ic("rollout.sync.max_off_policy_lag=1") == "tis"
    assert ic("rollout.sync.max_off_policy_lag=1", "algorithm.tis=off") == "none"
    assert ic("algorithm.tis=true") == "tis" and ic("algorithm.tis=auto") == "none"
    assert load_config(None, ["algorithm.tis_cap=3"]).algorithm.is_cap == 3.0
    assert AlgorithmConfig().is_correction == "auto"  # resolved only with the whole config in view
    a = load_config(None, ["algorithm.is_correction=icepop"]).algorithm
    assert (a.is_low, a.is_high) == (0.5, 5.0)  # the preset's band, resolved into the config
    a = load_config(None, ["algorithm.is_correction=seq_mask_tis", "algorithm.is_high=1.5"]).algorithm
    assert (a.is_low, a.is_high, a.is_cap) == (0.5, 1.5, 2.0)


@pytest.mark.parametrize("overrides, named", [
    (["algorithm.tis=maybe"], "algorithm.tis must be true, false or auto"),
    (["algorithm.tis=true", "algorithm.is_correction=icepop"], "algorithm.tis=true"),
    (["algorithm.tis_cap=3", "algorithm.is_cap=4"], "algorithm.tis_cap=3"),
    (["algorithm.is_correction=sometimes"], "algorithm.is_correction"),
    (["algorithm.is_correction=tis", "algorithm.is_low=0.2"], "algorithm.is_low is the band"),
    (["algorithm.is_correction=icepop", "algorithm.is_low=3", "algorithm.is_high=2"], "algorithm.is_low=3.0 must be"),
    (["rollout.sync.on_logprob_mismatch=correct"], "rollout.sync.on_logprob_mismatch=correct needs"),
])
def test_bad_is_correction_settings_are_one_line_naming_the_key(overrides, named):
    from rlhf_ray.config import ConfigError
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert named in str(e.value) and "\n" not in str(e.value), str(e.value)
