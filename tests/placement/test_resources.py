"""What the RL roles ask Ray for, and the plan placed on the live cluster (`placement.groups.check_fits`)."""
import pytest

from rlhf_ray.config import load_config
from rlhf_ray.placement.groups import ClusterTooSmallError, check_fits
from rlhf_ray.placement.plan import place


def resource_asks(cfg):
    """{role: {"CPU": n, "GPU": n}} for every process the RL stage starts, as the plan counts them."""
    return place(cfg).asks()


def test_asks_follow_the_roles():
    grpo = resource_asks(load_config(None, ["cluster.placement=distributed"]))
    assert set(grpo) == {"policy", "generator", "reward", "reference"}
    ppo_lora = resource_asks(load_config(None, ["algorithm.name=ppo", "model.lora.enabled=true",
                                                "cluster.placement=distributed"]))
    assert "critic" in ppo_lora and "reference" not in ppo_lora  # LoRA: the reference is the policy
    colocated = resource_asks(load_config())
    assert colocated == {"policy": {"CPU": 1.0, "GPU": 0.0}}  # one process holds every role


def test_a_too_small_cluster_is_named_before_any_actor_starts():
    cfg = load_config(None, ["cluster.placement=distributed"])
    check_fits(cfg, {"CPU": 8})
    with pytest.raises(ClusterTooSmallError, match=r"ask for 3 CPUs and 0 GPUs \(policy 1 CPU 0 GPU; generator 1 CPU "
                                                   r"0 GPU; reference 0.5 CPU 0 GPU; reward 0.5 CPU 0 GPU\) but the "
                                                   r"Ray cluster has 2 and 0"):
        check_fits(cfg, {"CPU": 2})
    gpu = load_config("configs/gpu/llama3.1-8b-8xh100.yaml")
    with pytest.raises(ClusterTooSmallError, match="8 GPUs"):
        check_fits(gpu, {"CPU": 64, "GPU": 4})


def test_per_node_resources_decide_not_the_totals():
    """Two nodes of 4 GPUs hold 8 GPUs in total, but an engine of TP=8 needs 8 on one node."""
    cfg = load_config("configs/gpu/llama3.1-70b-4x8xh100.yaml")
    node = lambda g: {"Alive": True, "Resources": {"CPU": 64.0, "GPU": float(g)}}  # noqa: E731
    plan = check_fits(cfg, nodes=[{"Alive": True, "Resources": {"CPU": 8.0}}] + [node(8)] * 4)  # CPU-only head
    assert {b.node for b in plan.bundles_of("generator")} <= {1, 2, 3, 4}
    with pytest.raises(ClusterTooSmallError, match="generator #0 asks for 8 GPU"):
        check_fits(cfg, nodes=[node(4)] * 8)
