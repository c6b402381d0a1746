"""The algorithm registry: every entry names real components, and reading it costs no torch import."""
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_ray.algo import ADVANTAGE_ESTIMATORS, AGGREGATIONS, ALGORITHMS, KL_ESTIMATORS, get_algorithm

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_each_spec_names_registered_components(name):
    spec = ALGORITHMS[name]
    assert spec.name == name
    assert spec.estimator in ADVANTAGE_ESTIMATORS and spec.loss_agg in AGGREGATIONS
    assert spec.kl_kind in KL_ESTIMATORS
    # a KL in the loss needs an estimator with a useful gradient (losses.kl_loss refuses k1)
    assert spec.kl_in_reward or spec.kl_kind != "k1"
    params = inspect.signature(ADVANTAGE_ESTIMATORS[spec.estimator]).parameters
    assert set(spec.options) <= set(params), f"{name}: options {spec.options} not keywords of {spec.estimator}"
    assert spec.uses_critic == (spec.estimator == "gae")


def test_the_papers_choices():
    assert get_algorithm("dr_grpo").loss_agg == "seq-mean-token-sum-norm"  # Liu 2025: no 1/|o_i|
    assert get_algorithm("grpo").loss_agg == "seq-mean-token-mean"         # Shao 2024 eq. 3
    assert not get_algorithm("grpo").kl_in_reward and get_algorithm("grpo").kl_kind == "k3"
    assert get_algorithm("ppo").kl_in_reward and get_algorithm("ppo").uses_critic
    assert get_algorithm("reinforce_pp").options == {"baseline": "baseline"}
    with pytest.raises(ValueError, match="allowed"):
        get_algorithm("a2c")


def test_reading_the_registry_imports_no_torch():
    code = "import sys, rlhf_ray.algo.registry as r; r.get_algorithm('ppo'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_dapo_defaults_resolve_into_the_config_and_yield_to_explicit_values():
    from rlhf_ray.config import load_config
    spec = get_algorithm("dapo")
    assert spec.estimator == "grpo" and spec.loss_agg == "token-mean" and not spec.kl_in_reward
    a = load_config(None, ["algorithm.name=dapo", "rollout.max_new_tokens=40"]).algorithm
    # Yu 2025: dynamic sampling, clip-higher 0.28, token-level loss, overlong buffer a fifth of the limit
    assert (a.dynamic_sampling, a.clip_low, a.clip_high, a.loss_agg, a.overlong_buffer) == (True, 0.2, 0.28,
                                                                                            "token-mean", 8)
    mine = load_config(None, ["algorithm.name=dapo", "algorithm.dynamic_sampling=false", "algorithm.clip_high=0.2",
                              "algorithm.overlong_buffer=0", "algorithm.loss_agg=seq-mean-token-mean"]).algorithm
    assert (mine.dynamic_sampling, mine.clip_high, mine.overlong_buffer, mine.loss_agg) == (False, 0.2, 0,
                                                                                           "seq-mean-token-mean")
    # the defaults belong to dapo alone
    g = load_config(None, ["algorithm.name=grpo"]).algorithm
    assert (g.dynamic_sampling, g.clip_high, g.overlong_buffer) == (False, 0.2, 0)
