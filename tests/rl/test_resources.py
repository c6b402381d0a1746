import pytest

from rlhf_ray.config import load_config
from rlhf_ray.rl.resources import ClusterTooSmallError, check_fits, resource_asks


def test_asks_follow_the_roles():
    grpo = resource_asks(load_config(None, ["cluster.placement=distributed"]))
    assert set(grpo) == {"rl.policy", "rollout", "reward", "reference"}
    assert set(resource_asks(load_config())) == {"rl.policy"}  # colocated: every role in the policy ranks
    ppo_lora = resource_asks(load_config(None, ["algorithm.name=ppo", "model.lora.enabled=true",
                                                "cluster.placement=distributed"]))
    assert "rl.critic" in ppo_lora and "reference" not in ppo_lora  # LoRA: the reference is the policy


def test_a_too_small_cluster_is_named_before_any_actor_starts():
    cfg = load_config(None, ["cluster.placement=distributed"])
    check_fits(cfg, {"CPU": 8})
    with pytest.raises(ClusterTooSmallError, match=r"ask for 3 CPUs \(rl.policy 1, rollout 1, reward 0.5, "
                                                   r"reference 0.5\) but the Ray cluster has 2"):
        check_fits(cfg, {"CPU": 2})
    gpu = load_config("configs/gpu/llama3.1-8b-8xh100.yaml")
    with pytest.raises(ClusterTooSmallError, match="GPUs"):
        check_fits(gpu, {"CPU": 64, "GPU": 4})
