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
