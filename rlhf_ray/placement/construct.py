"""Construction arguments: for every process of the plan, exactly what its libraries are built with.

The one owner of these values. `construct(cfg, plan)` is a pure function of the config and the plan (the
plan carries the device and, after `budget`, the scoring micro-batches); both placements
(`rlhf_ray.placement.colocated`, `rlhf_ray.placement.distributed`) build every engine, learner and scorer from its
records and from nothing else, the simulation builds its twin's from the same function, and
`rlhf-ray plan CONFIG --json` prints them per process, so a user sees before launch what each GPU runs.

Decisions made here, each from the installed sources (docs/GPU.md has the reasoning):
  - engine quantization: `rollout.quantization` (auto: online fp8 under a 4-bit policy on a GPU;
    vLLM 0.32's name, `rlhf_ray.roles.generator.engine.quantization_for`);
  - compiled decoding (CUDA graphs on a GPU, torch.compile on a CPU) unless `rollout.enforce_eager` says
    otherwise;
  - vLLM's sleep mode only where the plan makes the engine sleep (colocated on CUDA);
  - a tensor-parallel engine on CUDA runs vLLM's multiprocessing executor inside its actor: inside a Ray
    placement group vLLM otherwise picks its Ray executor, which refuses a bundle of more than one GPU
    (`vllm/config/parallel.py`, `vllm/v1/executor/ray_utils.py`);
  - a ZeRO-3 learner is built under `deepspeed.zero.Init` (transformers does so only while an
    `HfDeepSpeedConfig` is alive: `rlhf_ray.learner.build.build_model(deepspeed_config=...)`);
  - each learner rank sees only its own GPU (NCCL keeps P2P/NVLink to peers it cannot see);
  - weights cross to GPU engines over NCCL (device to device), to CPU engines through the object store
    when everything shares one node; exports gather on the host.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from rlhf_ray.placement.plan import Bundle, Plan, PlanError, engine_quantization, role_dtype
from rlhf_ray.utils.device import Backend, logprob_tolerance, make_backend
from rlhf_ray.utils.phases import side_by_side

if TYPE_CHECKING:
    from rlhf_ray.config import Config

# Seconds the weight-sync group (TCP store and NCCL/gloo) waits for a rank that does not arrive.
SYNC_TIMEOUT_S = 120.0
# Where full-weight exports and the sync's restore point gather: host memory, never a second copy on the GPU.
EXPORT_DEVICE = "cpu"


@dataclass(frozen=True)
class EngineArgs:
    """One vLLM engine (`rlhf_ray.roles.generator.engine.GeneratorEngine`): `vllm.LLM(**llm_kwargs(model))`."""
    index: int
    device: str
    dtype: str
    quantization: Optional[str]
    tensor_parallel_size: int
    gpu_memory_utilization: float
    enforce_eager: bool
    block_size: Optional[int]           # tokens per KV-cache block; None: vLLM's own
    enable_sleep_mode: bool
    distributed_executor_backend: Optional[str]
    max_model_len: int
    enable_lora: bool
    max_lora_rank: Optional[int]        # vLLM's slot (1, 8, 16, ...); None without LoRA
    seed: int
    env: dict = field(default_factory=dict)   # the engine process's environment (`roles.generator.threads.engine_env`)

    def llm_kwargs(self, model: str) -> dict[str, Any]:
        from rlhf_ray.roles.generator.engine import llm_kwargs
        return llm_kwargs(model, dtype=self.dtype, tensor_parallel_size=self.tensor_parallel_size,
                          gpu_memory_utilization=self.gpu_memory_utilization, seed=self.seed,
                          max_model_len=self.max_model_len, lora=self.enable_lora,
                          max_lora_rank=self.max_lora_rank or 16, quantization=self.quantization,
                          enforce_eager=self.enforce_eager, enable_sleep_mode=self.enable_sleep_mode,
                          distributed_executor_backend=self.distributed_executor_backend, block_size=self.block_size)


@dataclass(frozen=True)
class LearnerArgs:
    """One learner rank (`rlhf_ray.learner.learner.Learner` and its model, `learner.build.build_model`)."""
    role: str                      # policy | critic
    kind: str                      # policy | value (the HF head)
    rank: int
    world_size: int
    device: str
    dtype: str
    dist_backend: str
    threads: int
    zero_stage: int
    zero_init: bool                # built under deepspeed.zero.Init (ZeRO-3): each rank holds 1/world of the weights
    offload_optimizer: bool
    offload_params: bool
    load_in_4bit: bool
    bnb_4bit: Optional[dict]       # BitsAndBytesConfig arguments of the 4-bit base; None: not quantized
    gradient_checkpointing: bool
    lora_rank: int                 # 0: full fine-tuning
    deepspeed_config: dict         # what deepspeed.initialize (and zero.Init) gets
    visible_gpus: tuple[int, ...]  # CUDA_VISIBLE_DEVICES of the rank: its own GPU (local rank 0)
    export_device: str = EXPORT_DEVICE

    def backend(self) -> Backend:
        return make_backend(self.device, self.dtype, self.dist_backend)


@dataclass(frozen=True)
class ScorerArgs:
    """The reward scorer or the frozen reference (`rlhf_ray.roles.reward`, `rlhf_ray.roles.reference`)."""
    role: str
    device: str
    dtype: str
    micro_batch: int

    def backend(self) -> Backend:
        return make_backend(self.device, self.dtype)


@dataclass(frozen=True)
class ProcessArgs:
    """One process of the plan (one bundle): what each of its libraries is built with."""
    roles: tuple[str, ...]
    index: int
    node: int
    gpus: tuple[int, ...]
    cpus: float
    gpu_ask: float
    threads: int                   # the process's torch threads (its phases' shares: `Construction.shares`)
    engine: Optional[EngineArgs] = None
    learners: tuple[LearnerArgs, ...] = ()
    scorers: tuple[ScorerArgs, ...] = ()


@dataclass(frozen=True)
class Share:
    """One phase's part of its process's cores: `threads` torch threads (0: leave them as they are), pinned to
    the slice `cores` = (start, stop) of the process's cores (None: all of them; `rlhf_ray.utils.phases`)."""
    threads: int
    cores: Optional[tuple[int, Optional[int]]] = None


@dataclass(frozen=True)
class PhaseShares:
    """What each phase takes of its process's cores, alone or beside another: with `rollout.sync.
    max_off_policy_lag` >= 1 the next step's generation runs beside this step's update, on disjoint cores."""
    generate: Share                  # an engine sampling alone
    generate_beside_update: Share    # ... beside the learners' update
    score: Share                     # each scoring role (distributed: reward, reference and values at once)
    update: Share                    # each learner role (distributed: policy and critic at once)
    update_beside_generate: Share    # ... beside the next step's generation
    # colocated PPO on host cores, one rank: the policy's update and the critic's at once, each on its own
    # slice (policy, critic); None: one after the other with every core (`colocated_shares` says when)
    policy_and_critic: Optional[tuple[Share, Share]] = None
    # colocated scoring on host cores, one rank: each scoring micro-batch's rows split over these one-core
    # shares and computed at once (`rlhf_ray.utils.phases.CoreTeam`); (): one pass on the `score` share
    score_rows: tuple[Share, ...] = ()


@dataclass(frozen=True)
class SyncArgs:
    mode: str                      # full | adapter
    transport: str                 # in_process | object_store | collective
    backend: str                   # the collective's: nccl | gloo
    timeout_s: float
    bucket_mb: float
    # where a streamed transport re-syncs a restarted engine from (`rlhf_ray.sync.streamed`): the learner in
    # lockstep (its weights are the served ones while the engines sample), a copy on disk where rollouts may lag
    restore: str                   # learner | disk
    agreement_precisions: tuple[str, ...]   # rows of utils.device.LOGPROB_TOLERANCE the thresholds come from
    logprob_max_abs_diff: float
    logprob_mean_abs_diff: float


@dataclass(frozen=True)
class Construction:
    placement: str
    device: str
    simulated: bool
    cores: int                     # a node's cores the thread counts were split from
    processes: tuple[ProcessArgs, ...]
    sync: SyncArgs
    shares: PhaseShares            # every phase's threads and cores (the same in each process of a role)

    def process(self, role: str, index: int = 0) -> ProcessArgs:
        for p in self.processes:
            if role in p.roles and p.index == index:
                return p
        raise PlanError(f"no {role} #{index} among the constructed processes")

    def engines(self) -> list[EngineArgs]:
        return [p.engine for p in self.processes if p.engine is not None]

    def learners(self, role: str) -> list[LearnerArgs]:
        return sorted((a for p in self.processes for a in p.learners if a.role == role), key=lambda a: a.rank)

    def scorer(self, role: str) -> Optional[ScorerArgs]:
        return next((s for p in self.processes for s in p.scorers if s.role == role), None)

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


# -- the decisions, one function each ---------------------------------------------------------
def role_backend(cfg: "Config", plan: Plan, role: str) -> Backend:
    """A role's device, dtype and dist backend, all read from the plan (never the driver's own node)."""
    return make_backend(plan.role_device(role), role_dtype(cfg, plan, role), plan.dist_backend(role))


def sync_mode(cfg: "Config", plan: Plan) -> str:
    """What travels to the engines. `auto`: the adapter alone where the device's engine runs LoRA at full
    speed; elsewhere the merged weights (vLLM's CPU LoRA path decoded 2.4x slower than the base)."""
    mode = cfg.rollout.sync.mode
    if mode != "auto":
        return mode
    fast = role_backend(cfg, plan, "generator").fast_engine_lora
    return "adapter" if cfg.model.lora.enabled and fast else "full"


def engine_by_device(cfg: "Config", plan: Plan) -> dict[str, Any]:
    """The engine settings the rollout section leaves to the generator's device when unset (eager decoding, the
    KV-cache block), decided as an engine built without a plan decides them (`generator.engine.by_device`)."""
    from rlhf_ray.roles.generator.engine import by_device
    return by_device(cfg.rollout, role_backend(cfg, plan, "generator"))


def enforce_eager(cfg: "Config", plan: Plan) -> bool:
    """`rollout.enforce_eager`, unset: vLLM's own default, compiled (`generator.engine.by_device`)."""
    return engine_by_device(cfg, plan)["enforce_eager"]


def engine_args(cfg: "Config", plan: Plan, index: int) -> EngineArgs:
    from rlhf_ray.roles.generator.engine import lora_rank_slot
    from rlhf_ray.roles.generator.threads import engine_env
    r = cfg.rollout
    device = plan.role_device("generator")
    # a simulated TP engine keeps its bundle of logical GPUs; one CPU process computes
    tp = 1 if plan.simulated else r.tensor_parallel_size
    lora = sync_mode(cfg, plan) == "adapter"
    return EngineArgs(
        index=index, device=device, dtype=role_dtype(cfg, plan, "generator"),
        quantization=engine_quantization(cfg, plan), tensor_parallel_size=tp,
        gpu_memory_utilization=r.gpu_memory_utilization, **engine_by_device(cfg, plan),
        enable_sleep_mode=plan.engine_sleeps,
        distributed_executor_backend="mp" if tp > 1 and device == "cuda" else None,
        max_model_len=cfg.data.max_prompt_len + r.max_new_tokens, enable_lora=lora,
        max_lora_rank=lora_rank_slot(cfg.model.lora.r) if lora else None, seed=r.seed or 0,
        env=engine_env(r.model_copy(update={"tensor_parallel_size": tp})))


def learner_args(cfg: "Config", plan: Plan, role: str, rank: int, threads: int) -> LearnerArgs:
    import torch

    from rlhf_ray.learner.ds_config import deepspeed_config
    lc = cfg.rl.policy if role == "policy" else cfg.rl.critic
    # colocated: the critic rank lives in the policy rank's process and joins its process group
    world = cfg.rl.policy.num_ranks if plan.placement == "colocated" else lc.num_ranks
    dtype = role_dtype(cfg, plan, role)
    device = plan.role_device(role)
    m, q = cfg.model, cfg.model.quantization
    bnb = None
    if q.load_in_4bit:
        bnb = dict(bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
                   bnb_4bit_compute_dtype=dtype if q.compute_dtype == "auto" else q.compute_dtype)
    ds = deepspeed_config(lc, world_size=world, dtype=getattr(torch, dtype))
    bundle = plan.bundle(role, rank)
    return LearnerArgs(
        role=role, kind="policy" if role == "policy" else "value", rank=rank, world_size=world, device=device,
        dtype=dtype, dist_backend=plan.dist_backend(role), threads=threads, zero_stage=lc.deepspeed.zero_stage,
        zero_init=lc.deepspeed.zero_stage == 3, offload_optimizer=lc.deepspeed.offload_optimizer,
        offload_params=lc.deepspeed.offload_params, load_in_4bit=q.load_in_4bit, bnb_4bit=bnb,
        gradient_checkpointing=m.gradient_checkpointing, lora_rank=m.lora.r if m.lora.enabled else 0,
        deepspeed_config=ds, visible_gpus=bundle.gpus if device == "cuda" else ())


def scorer_args(cfg: "Config", plan: Plan, role: str) -> ScorerArgs:
    return ScorerArgs(role, plan.role_device(role), role_dtype(cfg, plan, role), plan.micro_batches.get(role, 64))


def sync_args(cfg: "Config", plan: Plan) -> SyncArgs:
    s = cfg.rollout.sync
    gen_device = plan.role_device("generator")
    if plan.placement == "colocated":
        transport = "in_process"  # each rank hands its weights to its own engine
    elif gen_device == "cuda" or plan.simulated or len({b.node for b in plan.bundles}) > 1:
        # GPU to GPU over NCCL; across nodes (a simulated node is a Ray node apart from the driver's) a broadcast
        transport = "collective"
    else:
        transport = "object_store"  # one CPU node: one put, zero-copy maps
    if s.logprob_precision != "auto":
        precisions: tuple[str, ...] = (s.logprob_precision,)
    else:
        precisions = (role_dtype(cfg, plan, "policy"), role_dtype(cfg, plan, "generator"))
        if (engine_quantization(cfg, plan) or "").startswith("fp8"):
            precisions += ("fp8",)
    max_abs, mean_abs = logprob_tolerance(precisions)
    return SyncArgs(mode=sync_mode(cfg, plan), transport=transport, backend="nccl" if gen_device == "cuda" else "gloo",
                    timeout_s=SYNC_TIMEOUT_S, bucket_mb=s.bucket_mb,
                    restore="disk" if s.max_off_policy_lag >= 1 else "learner", agreement_precisions=precisions,
                    logprob_max_abs_diff=s.logprob_max_abs_diff or max_abs,
                    logprob_mean_abs_diff=s.logprob_mean_abs_diff or mean_abs)


def node_cores(plan: Plan, node: int) -> int:
    """Cores of a planned node: declared or read from Ray, else this machine's (a local run)."""
    cpus = plan.cluster.nodes[node].cpus if 0 <= node < len(plan.cluster.nodes) else None
    return int(cpus) if cpus else (os.cpu_count() or 1)


def construct(cfg: "Config", plan: Plan, cores: Optional[int] = None) -> Construction:
    """Every process of `plan` with the arguments its libraries are built with. `cores`: a node's cores that
    thread counts split (default: the plan's node 0, declared or read from Ray, else this machine's)."""
    cores = cores or node_cores(plan, plan.bundles[0].node if plan.bundles else 0)
    if plan.placement == "colocated":
        threads = colocated_threads(cfg, cores)
        processes = tuple(_colocated_process(cfg, plan, b, threads) for b in plan.bundles)
        shares = colocated_shares(cfg, threads, plan.device)
    else:
        threads = cfg.cluster.torch_threads or cores
        processes = tuple(_distributed_process(cfg, plan, b, threads) for b in plan.bundles)
        shares = distributed_shares(cfg, threads)
    return Construction(plan.placement, plan.device, plan.simulated, cores, processes, sync_args(cfg, plan), shares)


def colocated_threads(cfg: "Config", cores: int) -> int:
    """A colocated process's threads: the node's cores split between the ranks that share it."""
    ranks = cfg.rl.policy.num_ranks
    return cfg.cluster.torch_threads or max(1, cores // min(ranks, cores))


def colocated_shares(cfg: "Config", threads: int, device: str) -> PhaseShares:
    """One process per rank runs every phase: each phase alone takes all its threads (a generation
    `rollout.threads`, tiny models decode faster on one); a generation beside the update keeps its engine's
    `rollout.cpus_per_engine` of them and the update the rest. Ranks sharing a node split it by threads only
    (their processes' core lists are the same).

    PPO's two learners update at once on host cores, half the threads each, where one rank runs them: two
    OpenMP teams of one thread lose none of a small model's GEMM time to fork and join (the tiny PPO task's
    4 epochs of both: 0.92 s against 1.16 s one after the other with 2 threads, AMD EPYC, 2 cores). Not with
    several ranks (each learner's gradient all-reduce must keep one order across the ranks) and not on a GPU
    (the memory plan counts the two updates apart).

    Scoring (the reward model, the reference and the critic's values, all without gradients) splits each
    micro-batch's rows over the host cores of a single rank, one thread and core each (`CoreTeam` says why).
    Not under ZeRO-3 (a learner's forward gathers its partitioned weights, one gather at a time), not with
    several ranks (their processes share a core list) and not on a GPU (one device, one stream)."""
    from rlhf_ray.roles.generator.threads import engine_threads
    gen, upd = side_by_side(threads, engine_threads(cfg.rollout.cpus_per_engine))
    if cfg.rl.policy.num_ranks > 1:
        gen, upd = (gen[0], None), (upd[0], None)
    both = None
    if cfg.uses_critic and cfg.rl.policy.num_ranks == 1 and device == "cpu" and threads >= 2:
        policy, critic = side_by_side(threads, threads // 2)
        both = (Share(*policy), Share(*critic))
    rows: tuple[Share, ...] = ()
    learners = (cfg.rl.policy, cfg.rl.critic) if cfg.uses_critic else (cfg.rl.policy,)
    if (cfg.rl.policy.num_ranks == 1 and device == "cpu" and threads >= 2
            and all(lc.deepspeed.zero_stage < 3 for lc in learners)):
        rows = tuple(Share(1, (i, i + 1)) for i in range(threads))
    return PhaseShares(generate=Share(cfg.rollout.threads or threads), generate_beside_update=Share(*gen),
                       score=Share(threads), update=Share(threads), update_beside_generate=Share(*upd),
                       policy_and_critic=both, score_rows=rows)


def distributed_shares(cfg: "Config", cores: int) -> PhaseShares:
    """Each role its own processes, roles of a phase at once on a node's `cores`: scoring splits them between
    the reward, the reference and the critic's values; an update between the policy and the critic. Beside an
    update the engines keep the first `rollout.cpus_per_engine` cores (their Ray share), the learners the rest;
    an engine alone takes `rollout.threads` (0: every core)."""
    from rlhf_ray.roles.generator.threads import engine_threads
    g = engine_threads(cfg.rollout.cpus_per_engine)
    critic = 1 if cfg.uses_critic else 0
    return PhaseShares(generate=Share(cfg.rollout.threads or 0), generate_beside_update=Share(g, (0, g)),
                       score=Share(max(1, cores // (2 + critic))), update=Share(max(1, cores // (1 + critic))),
                       update_beside_generate=Share(max(1, (cores - g) // (1 + critic)),
                                                    (g, None) if cores > g else None))


def _colocated_process(cfg: "Config", plan: Plan, b: Bundle, threads: int) -> ProcessArgs:
    learners = [learner_args(cfg, plan, "policy", b.index, threads)]
    if "critic" in b.roles:
        learners.append(learner_args(cfg, plan, "critic", b.index, threads))
    scorers = tuple(scorer_args(cfg, plan, r) for r in ("reward", "reference") if r in b.roles and r in plan.roles)
    return ProcessArgs(b.roles, b.index, b.node, b.gpus, b.cpus, b.gpu_ask, threads,
                       engine=engine_args(cfg, plan, b.index), learners=tuple(learners), scorers=scorers)


def _distributed_process(cfg: "Config", plan: Plan, b: Bundle, threads: int) -> ProcessArgs:
    (role,) = b.roles
    common = dict(roles=b.roles, index=b.index, node=b.node, gpus=b.gpus, cpus=b.cpus, gpu_ask=b.gpu_ask)
    if role in ("policy", "critic"):
        return ProcessArgs(**common, threads=threads, learners=(learner_args(cfg, plan, role, b.index, threads),))
    if role == "generator":
        return ProcessArgs(**common, threads=threads, engine=engine_args(cfg, plan, b.index))
    return ProcessArgs(**common, threads=threads, scorers=(scorer_args(cfg, plan, role),))
