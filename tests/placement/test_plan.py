"""Every shipped GPU config is placed on the cluster it declares and fits its memory; broken variants
are refused naming the role and the line item. Model shapes come from a hub cache made here."""
from pathlib import Path

import pytest

from rlhf_ray.cli import main
from rlhf_ray.config import load_config
from rlhf_ray.placement.budget import budget
from rlhf_ray.placement.plan import PlanError, engine_quantization, place, role_dtype
from rlhf_ray.placement.report import model_config
from rlhf_ray.preflight import check_plan

ROOT = Path(__file__).resolve().parents[2]
GPU_CONFIGS = sorted((ROOT / "configs" / "gpu").rglob("*.yaml"))


def planned(path, *overrides):
    cfg = load_config(path, list(overrides))
    return budget(cfg, place(cfg), model_config)


def test_gpu_configs_were_found():
    assert len(GPU_CONFIGS) >= 3, GPU_CONFIGS


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_shipped_gpu_config_fits_its_cluster(path, hub, capsys):
    plan, problems = planned(path)
    assert problems == []
    cfg = load_config(path)
    assert sum(a["GPU"] for a in plan.asks().values()) <= cfg.cluster.num_nodes * cfg.cluster.gpus_per_node
    assert all(b.gpus for b in plan.bundles if b.roles != ("reward",) or cfg.reward.num_gpus)  # GPU roles got GPUs
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "headroom" in out and "DOES NOT FIT" not in out


def test_tp_engines_are_counted_once():
    """The 70B config validated at 32 GPUs while the old preflight counted 144 (gpus x TP x engines)."""
    plan = place(load_config(ROOT / "configs/gpu/llama3.1-70b-4x8xh100.yaml"))
    assert sum(a["GPU"] for a in plan.asks().values()) == 32
    engines = plan.bundles_of("generator")
    assert [len(b.gpus) for b in engines] == [8, 8] and len({b.node for b in engines}) == 2


def test_70b_on_too_few_nodes_is_refused_before_launch():
    path = ROOT / "configs/gpu/llama3.1-70b-4x8xh100.yaml"
    with pytest.raises(PlanError, match=r"policy #8 asks for 1 GPU\(s\).*\(3 node\(s\), 24 GPUs\)"):
        check_plan(load_config(path, ["cluster.num_nodes=3"]))
    with pytest.raises(PlanError, match=r"generator #1 asks for 8 GPU\(s\) and 1 CPU\(s\) on one node"):
        check_plan(load_config(path, ["cluster.num_nodes=1"]))


def test_70b_on_too_few_gpus_is_refused_naming_the_line_item(hub):
    path = ROOT / "configs/gpu/llama3.1-70b-4x8xh100.yaml"
    _, problems = planned(path, "rl.policy.num_ranks=3")  # ZeRO-3 over 3 ranks: 47 GB of weights each
    assert any("while it trains" in p and "policy weights (bfloat16) 43.8 GiB" in p for p in problems), problems
    _, problems = planned(path, "rollout.tensor_parallel_size=1", "rollout.gpus_per_engine=1")
    assert any("KV cache gets" in p and "engine weights (bfloat16) 131.4 GiB" in p
               for p in problems), problems


def test_4090_without_4bit_does_not_fit(hub, capsys):
    path = str(ROOT / "configs/gpu/llama3.1-8b-qlora-4090.yaml")
    overrides = ["model.quantization.load_in_4bit=false"]
    _, problems = planned(path, *overrides)
    assert any("node 0 GPU 0 needs" in p and "policy base weights (bfloat16)" in p for p in problems), problems
    assert main(["plan", path, *overrides]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_4090_engine_is_fp8_and_sleeps_while_training(hub):
    cfg = load_config(ROOT / "configs/gpu/llama3.1-8b-qlora-4090.yaml")
    plan, _ = planned(ROOT / "configs/gpu/llama3.1-8b-qlora-4090.yaml")
    assert plan.engine_sleeps and engine_quantization(cfg, plan) == "fp8_per_tensor"  # vLLM 0.32's name
    (items,) = plan.memory.values()
    assert [i.name for i in items if "train" in i.phases and i.role == "generator" and not i.host] == []


def test_too_small_utilization_leaves_no_kv_cache(hub):
    _, problems = planned(ROOT / "configs/gpu/llama3.1-8b-8xh100.yaml", "rollout.gpu_memory_utilization=0.2")
    assert any("generator KV cache gets" in p for p in problems), problems


def test_model_roles_without_gpu_on_cuda_are_refused(hub):
    _, problems = planned(ROOT / "configs/gpu/llama3.1-8b-8xh100.yaml", "reward.num_gpus=0", "reference.num_gpus=0")
    assert any(p.startswith("reward loads") for p in problems) and any(p.startswith("reference loads") for p in problems)


def test_scoring_micro_batches_shrink_until_logits_fit(hub):
    plan, _ = planned(ROOT / "configs/gpu/llama3.1-8b-8xh100.yaml")
    small, _ = planned(ROOT / "configs/gpu/llama3.1-8b-8xh100.yaml", "cluster.gpu_memory_gib=50")
    assert 1 <= small.micro_batches["reference"] < plan.micro_batches["reference"] <= 64


def test_roles_get_the_device_and_dtype_they_asked_for():
    cfg = load_config(ROOT / "configs/gpu/llama3.1-8b-8xh100.yaml")
    plan = place(cfg)
    assert {r: plan.role_device(r) for r in plan.roles} == dict.fromkeys(plan.roles, "cuda")
    assert role_dtype(cfg, plan, "reward") == "bfloat16"
    cpu = load_config(None, ["cluster.placement=distributed"])
    cpu_plan = place(cpu)
    assert cpu_plan.device == "cpu" and role_dtype(cpu, cpu_plan, "reference") == "float32"


def test_cuda_roles_asking_for_no_gpu_are_refused():
    with pytest.raises(PlanError, match="rollout.gpus_per_engine=0 on cluster.device=cuda"):
        check_plan(load_config(ROOT / "configs/gpu/llama3.1-8b-8xh100.yaml", ["rollout.gpus_per_engine=0"]))
    with pytest.raises(PlanError, match="gpus_per_engine=4 must equal rollout.tensor_parallel_size=8"):
        check_plan(load_config(ROOT / "configs/gpu/llama3.1-70b-4x8xh100.yaml", ["rollout.gpus_per_engine=4"]))


def test_colocated_puts_every_role_in_one_process_per_device():
    cfg = load_config(None, ["algorithm.name=ppo", "rl.policy.num_ranks=2"])
    plan = place(cfg)
    assert [b.roles for b in plan.bundles] == [("policy", "critic", "generator", "reference", "reward")] * 2
    assert plan.bundle("critic", 1) is plan.bundles[1] and not plan.engine_sleeps


def test_the_placement_lines_name_node_gpu_and_roles(hub, capsys):
    assert main(["plan", str(ROOT / "configs/gpu/llama3.1-70b-4x8xh100.yaml")]) == 0
    out = capsys.readouterr().out
    assert "node 0\n  GPUs 0-7: generator #0\n" in out and "node 3\n  GPUs 0-7: policy #8 ... policy #15\n" in out


def test_host_ram_is_checked_when_declared(hub):
    path = ROOT / "configs/gpu/llama3.1-70b-4x8xh100.yaml"
    _, problems = planned(path, "cluster.cpu_memory_gib=256")  # 8 ranks x 49 GiB of offloaded Adam states
    assert [p for p in problems if "host RAM" in p] == [
        f"node {n} needs 394 GiB of host RAM (offloaded optimizer states, sleeping engines) but has 256 GiB "
        f"(cluster.cpu_memory_gib)" for n in (2, 3)]


def test_a_simulated_plan_keeps_the_bundles_and_says_so_loudly(capsys):
    path = ROOT / "configs/gpu/llama3.1-8b-8xh100.yaml"
    real, sim = place(load_config(path)), place(load_config(path, ["cluster.simulate=true"]))
    assert real.bundles == sim.bundles and sim.simulated
    assert {sim.role_device(r) for r in sim.roles} == {"cpu"} and sim.dist_backend("policy") == "gloo"
    assert real.dist_backend("policy") == "nccl"
    from rlhf_ray.placement.report import format_plan
    assert format_plan(sim).startswith("*** SIMULATION")


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_the_readme_shows_the_current_plan(path, hub, capsys):
    main(["plan", str(path)])
    assert capsys.readouterr().out.rstrip() in (ROOT / "README.md").read_text(), f"update README's plan of {path.name}"


def test_the_4090_plan_counts_logits_over_response_positions(hub):
    plan, problems = planned(ROOT / "configs/gpu/llama3.1-8b-qlora-4090.yaml")
    cfg = load_config(ROOT / "configs/gpu/llama3.1-8b-qlora-4090.yaml")
    items = {i.name: i for i in next(iter(plan.memory.values())) if i.role == "policy"}
    head_tokens = cfg.rl.policy.micro_batch_size * (cfg.rollout.max_new_tokens + 1)
    assert items["logits (train)"].bytes == 128256 * head_tokens * (2 + 12)
    assert not problems
