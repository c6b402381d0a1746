"""The construction arguments (`rlhf_ray.placement.construct`): one record per process of the plan, what both
placements and the simulation build from, and what `rlhf-ray plan --json` prints. Each shipped GPU config is
checked against its plan without a GPU; `test_construct_libraries.py` runs the libraries' own validation."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf_ray.cli import main
from rlhf_ray.config import load_config
from rlhf_ray.placement.budget import budget
from rlhf_ray.placement.construct import construct
from rlhf_ray.placement.memory import GiB, PROCESS_OVERHEAD
from rlhf_ray.placement.plan import engine_quantization, place
from rlhf_ray.placement.report import model_config
from rlhf_ray.placement.shared import RoleSections
from rlhf_ray.utils.device import LOGPROB_TOLERANCE

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "configs" / "gpu"
GPU_CONFIGS = sorted(GPU.glob("*.yaml"))
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
QLORA, H100X8, H70B = (GPU / n for n in ("llama3.1-8b-qlora-4090.yaml", "llama3.1-8b-8xh100.yaml",
                                          "llama3.1-70b-4x8xh100.yaml"))


def built(path, *overrides):
    cfg = load_config(path, list(overrides))
    plan, problems = budget(cfg, place(cfg), model_config)
    return cfg, plan, construct(cfg, plan, cores=16), problems


# -- every shipped GPU config: the arguments match the plan --------------------------------------
@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_every_process_of_the_plan_has_its_arguments_and_they_match_it(path, hub):
    cfg, plan, args, problems = built(path)
    assert not problems
    assert [(p.roles, p.index, p.node, p.gpus) for p in args.processes] == \
        [(b.roles, b.index, b.node, b.gpus) for b in plan.bundles]
    for p in args.processes:
        if p.engine is not None:
            e = p.engine
            assert (e.device, e.quantization, e.tensor_parallel_size, e.enable_sleep_mode) == \
                ("cuda", engine_quantization(cfg, plan), cfg.rollout.tensor_parallel_size, plan.engine_sleeps)
            assert len(p.gpus) == e.tensor_parallel_size  # the bundle holds every GPU the engine's workers use
            assert e.max_model_len == cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
            assert e.llm_kwargs("m")["quantization"] == e.quantization
        for a in p.learners:
            lc = cfg.rl.policy if a.role == "policy" else cfg.rl.critic
            assert a.deepspeed_config["zero_optimization"]["stage"] == a.zero_stage == lc.deepspeed.zero_stage
            assert a.deepspeed_config["train_batch_size"] == lc.micro_batch_size * a.world_size
            assert a.deepspeed_config["bf16"]["enabled"] == (a.dtype == "bfloat16")
            assert a.zero_init == (a.zero_stage == 3)
            assert a.export_device == "cpu"
        for s in p.scorers:
            assert s.device == plan.role_device(s.role) and s.micro_batch == plan.micro_batches.get(s.role, 64)
    assert args.sync.backend == "nccl" and args.sync.timeout_s > 0


def test_plan_json_lists_every_process_with_its_construct_object(hub, capsys):
    assert main(["plan", str(H70B), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["processes"]) == len(place(load_config(H70B)).bundles)
    engine = next(p for p in out["processes"] if p["roles"] == ["generator"])["construct"]["engine"]
    assert engine["distributed_executor_backend"] == "mp" and engine["tensor_parallel_size"] == 8
    policy = next(p for p in out["processes"] if p["roles"] == ["policy"])
    assert policy["construct"]["learners"][0]["zero_init"] is True
    assert policy["memory"] and out["problems"] == []


# -- finding 1: the 4090 engine is quantized as the plan counts ---------------------------------
def test_the_4090_engine_is_online_fp8_under_vllm_032s_name(hub):
    from rlhf_ray.roles.generator.engine import quantization_for
    _, plan, args, _ = built(QLORA)
    (engine,) = args.engines()
    assert engine.quantization == "fp8_per_tensor" == quantization_for("cuda", True)
    items = [i.name for i in next(iter(plan.memory.values())) if i.role == "generator"]
    assert "engine weights (fp8_per_tensor)" in items  # the plan counts the engine that is built
    assert quantization_for("cpu", True) is None       # vLLM's CPU backend has no online fp8
    cfg = load_config(QLORA, ["rollout.quantization=fp8_per_channel"])
    assert construct(cfg, place(cfg)).engines()[0].quantization == "fp8_per_channel"


def test_the_plan_gives_every_phase_its_threads_and_cores():
    """Thread and core shares are the construction's, for both placements (the ranks and actors only apply them)."""
    from rlhf_ray.placement.construct import PhaseShares, Share

    def shares(*overrides):
        cfg = load_config(None, list(overrides))
        return construct(cfg, place(cfg), cores=8).shares
    # colocated, one rank on 8 cores: each phase alone has them all; beside the update an engine keeps its one
    one_core_each = tuple(Share(1, (i, i + 1)) for i in range(8))
    assert shares() == PhaseShares(Share(8), Share(1, (0, 1)), Share(8), Share(8), Share(7, (1, 8)),
                                   score_rows=one_core_each)
    assert shares("rollout.threads=1").generate == Share(1)  # a tiny model decodes faster on one
    # two ranks on the node: 4 threads each, split by threads only (the ranks' core lists are the same)
    assert shares("rl.policy.num_ranks=2") == PhaseShares(Share(4), Share(1), Share(4), Share(4), Share(3))
    # distributed PPO: scoring splits the cores three ways, an update two; beside a generation the engines
    # keep their two cores (rollout.cpus_per_engine) and the learners share the other six
    assert shares("cluster.placement=distributed", "algorithm.name=ppo", "rollout.cpus_per_engine=2") == \
        PhaseShares(Share(0), Share(2, (0, 2)), Share(2), Share(4), Share(3, (2, None)))
    assert shares("cluster.placement=distributed", "rollout.cpus_per_engine=8").update_beside_generate == Share(1)
    # colocated PPO, one rank on host cores: the policy's and the critic's updates at once, half the cores each;
    # not for GRPO (no critic), several ranks (their all-reduces keep one order), a GPU, or a single core
    assert shares("algorithm.name=ppo").policy_and_critic == (Share(4, (0, 4)), Share(4, (4, 8)))
    assert shares().policy_and_critic is None
    assert shares("algorithm.name=ppo", "rl.policy.num_ranks=2").policy_and_critic is None
    assert shares("cluster.placement=distributed", "algorithm.name=ppo").policy_and_critic is None
    from rlhf_ray.placement.construct import colocated_shares
    ppo = load_config(None, ["algorithm.name=ppo"])
    assert colocated_shares(ppo, 8, "cuda").policy_and_critic is None
    assert colocated_shares(ppo, 1, "cpu").policy_and_critic is None
    # scoring alone on one rank's host cores: each micro-batch's rows split over them, one core each; not on a
    # GPU, one core, several ranks (above: none), or under ZeRO-3 (a learner's forward gathers its weights)
    assert colocated_shares(ppo, 2, "cpu").score_rows == (Share(1, (0, 1)), Share(1, (1, 2)))
    assert colocated_shares(ppo, 8, "cuda").score_rows == colocated_shares(ppo, 1, "cpu").score_rows == ()
    zero3 = load_config(None, ["algorithm.name=ppo", "rl.critic.deepspeed.zero_stage=3"])
    assert colocated_shares(zero3, 8, "cpu").score_rows == ()
    assert shares("cluster.placement=distributed").score_rows == ()


def test_only_an_engine_the_plan_makes_sleep_is_built_with_sleep_mode():
    """vLLM's sleep mode is the plan's (`Plan.engine_sleeps`: colocated on CUDA). A distributed CUDA engine never
    sleeps, so it is built without it, and an engine built without a plan (tools, tests) has none either."""
    from rlhf_ray.config.schema import RolloutConfig
    from rlhf_ray.roles.generator.engine import engine_llm_kwargs
    from rlhf_ray.utils.device import make_backend
    cfg = load_config(H100X8)
    assert cfg.cluster.placement == "distributed" and not place(cfg).engine_sleeps
    assert [e.enable_sleep_mode for e in construct(cfg, place(cfg)).engines()] == [False] * cfg.rollout.num_engines
    cuda = make_backend("cuda", "bfloat16")
    assert engine_llm_kwargs("/m", RolloutConfig(), cuda, False, 128)["enable_sleep_mode"] is False
    assert engine_llm_kwargs("/m", RolloutConfig(), cuda, False, 128, engine_kwargs={"enable_sleep_mode": True})[
        "enable_sleep_mode"] is True


def test_explicit_fp8_on_a_cpu_engine_is_one_line_naming_the_key():
    from rlhf_ray.placement.plan import PlanError
    from rlhf_ray.preflight import check_plan
    with pytest.raises(PlanError, match="rollout.quantization=fp8_per_tensor needs a CUDA engine"):
        check_plan(load_config(None, ["rollout.quantization=fp8_per_tensor"]))


def test_a_kv_block_the_engines_device_refuses_is_one_line_before_anything_starts():
    from rlhf_ray.placement.plan import PlanError
    from rlhf_ray.preflight import check_plan
    with pytest.raises(PlanError, match="rollout.kv_block_size=16: vLLM's cpu attention takes multiples of 32"):
        check_plan(load_config(None, ["rollout.kv_block_size=16"]))   # vLLM refused it at the engine's build
    check_plan(load_config(None, ["rollout.kv_block_size=64"]))


# -- finding 3: ZeRO-3 learners are built under zero.Init ----------------------------------------
@pytest.mark.parametrize("path", [H100X8, H70B], ids=lambda p: p.name)
def test_every_zero3_learner_is_built_under_zero_init(path, hub):
    _, _, args, _ = built(path)
    learners = [a for p in args.processes for a in p.learners]
    assert learners and all(a.zero_init and a.zero_stage == 3 for a in learners)


# -- finding 4: the 70B TP=8 engine's executor fits its bundle -----------------------------------
def test_a_tensor_parallel_gpu_engine_runs_the_mp_executor_inside_its_bundle(hub):
    _, plan, args, _ = built(H70B)
    for e, b in zip(args.engines(), plan.bundles_of("generator")):
        assert e.distributed_executor_backend == "mp" and len(b.gpus) == e.tensor_parallel_size == 8
        assert e.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    _, _, single, _ = built(H100X8)
    assert single.engines()[0].distributed_executor_backend is None  # TP=1: vLLM's in-process executor


# -- finding 6: GPU engines capture CUDA graphs unless a config says otherwise --------------------
@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_gpu_engines_are_not_eager_unless_the_config_says_so(path, hub):
    assert not any(e.enforce_eager for e in built(path)[2].engines())
    assert all(e.enforce_eager for e in built(path, "rollout.enforce_eager=true")[2].engines())


def test_cpu_engines_compile_unless_the_config_says_eager():
    """vLLM's own default on a CPU too: one torch.compile of the forward at the engine's start, 11-32% less
    decode time a call after it (`generator.engine.by_device`); the quickstart's short demo says eager."""
    for overrides in ([], ["cluster.placement=distributed"]):
        cfg = load_config(None, overrides)
        assert not any(e.enforce_eager for e in construct(cfg, place(cfg)).engines())
        cfg = load_config(QUICKSTART, overrides)
        assert all(e.enforce_eager for e in construct(cfg, place(cfg)).engines())


def test_kv_blocks_are_small_enough_on_a_cpu_for_a_group_to_share_its_prompt_and_vllms_own_on_a_gpu(hub):
    """A group's samples share only their prompt's full KV blocks: vLLM's CPU default of 128 tokens shared
    nothing of a shorter prompt (each sample prefilled it again). A GPU keeps vLLM's own (16)."""
    for overrides in ([], ["cluster.placement=distributed"]):
        cfg = load_config(None, overrides)
        engines = construct(cfg, place(cfg)).engines()
        assert {e.block_size for e in engines} == {32} and engines[0].llm_kwargs("m")["block_size"] == 32
        cfg = load_config(None, [*overrides, "rollout.kv_block_size=128"])
        assert {e.block_size for e in construct(cfg, place(cfg)).engines()} == {128}
    gpu = built(H100X8)[2].engines()[0]
    assert gpu.block_size is None and "block_size" not in gpu.llm_kwargs("m")


# -- finding 8: capacities as the cards report them, the CUDA context as measured ------------------
def test_capacities_are_what_the_cards_report_not_their_nominal_size():
    caps = {p.name: load_config(p).cluster.gpu_memory_gib for p in GPU_CONFIGS}
    assert caps == {QLORA.name: 23.6, H100X8.name: 79.1, H70B.name: 79.1}


def test_the_per_process_overhead_is_at_least_the_measured_cuda_context():
    runs = json.loads((ROOT / "benchmarks/results/cuda_memory.json").read_text())
    measured = max(r["device_used_gib"] - r["reserved_peak_gib"] for r in runs)
    assert measured > 1.0 and PROCESS_OVERHEAD / GiB >= measured - 0.01


# -- finding 9: an fp8 engine's log-prob agreement has its own row -------------------------------
def test_an_fp8_engine_against_an_nf4_learner_is_checked_at_the_fp8_row(hub):
    _, _, args, _ = built(QLORA)
    fp8, bf16 = LOGPROB_TOLERANCE["fp8"], LOGPROB_TOLERANCE["bfloat16"]
    assert "fp8" in args.sync.agreement_precisions
    assert (args.sync.logprob_max_abs_diff, args.sync.logprob_mean_abs_diff) == fp8
    assert fp8[0] >= bf16[0] and bf16[1] <= fp8[1] < 0.3  # looser than bf16, tighter than a skipped sync
    _, _, pinned, _ = built(QLORA, "rollout.sync.logprob_precision=bfloat16")
    assert (pinned.sync.logprob_max_abs_diff, pinned.sync.logprob_mean_abs_diff) == bf16
    _, _, bf16_engine, _ = built(H100X8)
    assert "fp8" not in bf16_engine.sync.agreement_precisions


# -- finding 10: a learner rank sees its own GPU only ----------------------------------------------
@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_each_learner_rank_sees_only_its_own_gpu(path, hub):
    _, plan, args, _ = built(path)
    for p in args.processes:
        for a in p.learners:
            assert a.visible_gpus == plan.bundle(a.role, a.rank).gpus and len(a.visible_gpus) == 1
    assert "## Finding 10" in (ROOT / "docs/GPU.md").read_text()


# -- the simulation and both placements build from the same function ------------------------------
@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_the_simulation_constructs_the_same_processes_on_cpu(path, hub):
    from rlhf_ray.placement.simulate import simulated_config
    cfg = load_config(path)
    sim = simulated_config(cfg)
    real_args, sim_args = construct(cfg, place(cfg), cores=16), construct(sim, place(sim), cores=16)
    shape = lambda a: [(p.roles, p.index, p.node, p.gpus, p.cpus, p.gpu_ask,  # noqa: E731
                        [(x.role, x.rank, x.world_size, x.zero_stage) for x in p.learners],
                        [s.role for s in p.scorers], p.engine is not None) for p in a.processes]
    assert shape(sim_args) == shape(real_args)
    assert sim_args.simulated and {p.engine.device for p in sim_args.processes if p.engine} == {"cpu"}
    assert all(e.quantization is None and e.tensor_parallel_size == 1 for e in sim_args.engines())


class _Recorder:
    """Stands in for a class the placements build: records the arguments of each construction."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return SimpleNamespace(actors=[_Actor()])

    def options(self, **_):
        return self

    def remote(self, *args, **kwargs):
        return self(*args, **kwargs)


class _Actor:
    def __init__(self):
        self.setup_roles = SimpleNamespace(remote=lambda *a: a)


def test_the_distributed_placement_builds_every_actor_from_the_construction(hub, monkeypatch):
    import rlhf_ray.roles.generator.group as group
    import rlhf_ray.placement.distributed as dist
    cfg, plan, args, _ = built(H70B)
    seen = {}
    for name in ("LearnerGroup", "ReferenceActor", "RewardActor"):
        monkeypatch.setattr(dist, name, seen.setdefault(name, _Recorder()))
    monkeypatch.setattr(group, "GeneratorGroup", seen.setdefault("GeneratorGroup", _Recorder()))
    monkeypatch.setattr(dist, "engine_transport", seen.setdefault("engine_transport", _Recorder()))
    monkeypatch.setattr(dist, "actor_options", lambda *a: {})
    monkeypatch.setattr(dist, "generator_base", lambda *a: "/base")
    paths = SimpleNamespace(policy_init="/init", resolve=lambda p: p, scratch="/tmp")
    dist.DistributedRoles(RoleSections.of(cfg), args, paths, plan, {}, total_updates=10)
    (policy_call,) = seen["LearnerGroup"].calls
    learner = args.learners("policy")[0]
    assert policy_call[1]["backend"] == learner.backend() and policy_call[1]["num_threads"] == learner.threads
    (gen_args, gen_kwargs), = seen["GeneratorGroup"].calls
    engine = args.engines()[0]
    assert gen_kwargs["engine_kwargs"] == engine.llm_kwargs("/base")
    assert gen_kwargs["engine_kwargs"]["distributed_executor_backend"] == "mp"
    (sync_args, sync_kwargs), = seen["engine_transport"].calls  # the weight sync's transport, from the plan too
    assert sync_args[0] == args.sync.transport == "collective" and sync_kwargs["timeout_s"] == args.sync.timeout_s
    assert (sync_kwargs["backend"], sync_kwargs["mode"]) == (args.sync.backend, args.sync.mode)
    assert sync_kwargs["restore"] == args.sync.restore
    assert gen_args[1].tensor_parallel_size == engine.tensor_parallel_size


@pytest.mark.parametrize("lag, restore", [(0, "learner"), (1, "disk")])
def test_only_runs_whose_rollouts_may_lag_keep_a_restore_point_on_disk(hub, lag, restore):
    """Lockstep engines sample only while the learner holds the pushed weights: it re-syncs a restarted one,
    and no step writes the model to disk (`rlhf_ray.sync.streamed`)."""
    _, _, args, _ = built(H70B, f"rollout.sync.max_off_policy_lag={lag}")
    assert args.sync.restore == restore


@pytest.mark.parametrize("path", [H70B, QLORA], ids=["distributed", "colocated"])
def test_build_roles_gives_the_placement_its_sections_and_the_plans_construction(path, hub, monkeypatch):
    import rlhf_ray.placement.colocated as colo
    import rlhf_ray.placement.distributed as dist
    from rlhf_ray.placement.graph import build_roles
    cfg, plan, _, _ = built(path)
    monkeypatch.setattr(dist, "DistributedRoles", lambda *a: ("distributed", *a))
    monkeypatch.setattr(colo, "ColocatedRoles", lambda *a: ("colocated", *a))
    placement, sections, args, *_ = build_roles(cfg, SimpleNamespace(), plan, {}, 10)
    assert placement == cfg.cluster.placement
    assert sections == RoleSections.of(cfg) and args == construct(cfg, plan, cores=os.cpu_count())


def test_the_colocated_placement_builds_every_role_from_the_construction(hub, monkeypatch):
    import rlhf_ray.placement.colocated as colo
    cfg, plan, args, _ = built(QLORA)
    groups = _Recorder()
    monkeypatch.setattr(colo, "LearnerGroup", groups)
    monkeypatch.setattr(colo, "actor_options", lambda *a: {})
    monkeypatch.setattr(colo, "generator_base", lambda *a: "/base")
    monkeypatch.setattr(colo.ray, "get", lambda refs: refs)
    paths = SimpleNamespace(policy_init="/init", resolve=lambda p: p, scratch="/tmp")
    colo.ColocatedRoles(RoleSections.of(cfg), args, paths, plan, {}, total_updates=10)
    (call,) = groups.calls
    assert call[1]["backend"] == args.learners("policy")[0].backend()
    assert call[1]["rank_kwargs"]["shares"] == args.shares

    # the rank builds its engine and scorers from its process's record
    import rlhf_ray.roles.generator.engine as engine_mod
    import rlhf_ray.roles.reward as reward_mod
    built_with = {}
    monkeypatch.setattr(engine_mod, "GeneratorEngine", lambda *a, **k: built_with.setdefault("engine", (a, k)))
    monkeypatch.setattr(reward_mod, "RewardScorer", lambda *a, **k: built_with.setdefault("reward", (a, k)))
    monkeypatch.setattr(colo, "tied_names", lambda path: frozenset())
    monkeypatch.setattr(colo, "set_phase_threads", lambda n: None)
    rank = colo.ColocatedRank.__new__(colo.ColocatedRank)
    rank.sections, rank.threads, rank.critic, rank.reference = RoleSections.of(cfg), 1, None, None
    process = args.process("policy", 0)
    rank.setup_roles("/base", paths, 10, process)
    engine_args, engine_kwargs = built_with["engine"]
    assert engine_kwargs["engine_kwargs"] == process.engine.llm_kwargs("/base")
    assert engine_kwargs["quantization"] == engine_kwargs["engine_kwargs"]["quantization"] == "fp8_per_tensor"
    assert engine_kwargs["engine_kwargs"]["enable_sleep_mode"] and not engine_kwargs["engine_kwargs"]["enforce_eager"]
    reward = process.scorers[0]
    assert built_with["reward"][1]["batch_size"] == reward.micro_batch and built_with["reward"][1]["device"] == "cuda"
