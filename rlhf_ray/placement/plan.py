"""The cluster plan: which process runs which roles, on which node and GPU, and what it asks Ray for.

The one owner of resources. The CLI's preflight (`rlhf_ray.preflight.check_plan`: the declared cluster),
the run's placement on the live cluster (`placement/groups.check_fits`), the actor options (`placement/groups.py`) and
`rlhf-ray plan` all read it; no other code counts CPUs or GPUs. Config validation does not place (the plan
reads the config, not the other way round).

Placements (`cluster.placement`):
  colocated    one process per device (a GPU, or a CPU slot) holding a policy rank, its vLLM engine
               (TP 1), the critic rank, the reference (adapter off under LoRA) and the reward model;
               on CUDA the engine sleeps while the learner trains.
  distributed  every role in its own actors on its own GPUs (fractional asks share a GPU).
Packing is first-fit decreasing: whole-GPU asks (TP engines, learner ranks) first, then fractions on the
fullest GPU they fit. Each node's bundles become one STRICT_PACK placement group (verl's resource-pool
pattern), so a bundle's node is fixed at reservation and a TP engine never straddles nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from rlhf_ray.errors import RunError

if TYPE_CHECKING:
    from rlhf_ray.config import Config

ROLES = ("policy", "critic", "generator", "reference", "reward")


class PlanError(RunError, ValueError):
    """The config cannot be placed on the cluster, or does not fit its memory; names role and item."""


@dataclass(frozen=True)
class NodeSpec:
    gpus: int
    cpus: Optional[float] = None       # None: not declared (not checked)
    gpu_memory_gib: float = 0.0        # 0: not declared (memory not checked)
    cpu_memory_gib: float = 0.0        # host RAM; 0: not declared (not checked)
    ray_id: Optional[str] = None       # the live node this spec was read from (`from_ray`); None: declared


@dataclass(frozen=True)
class ClusterSpec:
    nodes: tuple[NodeSpec, ...]

    @classmethod
    def from_config(cls, c) -> "ClusterSpec":
        return cls(tuple(NodeSpec(c.gpus_per_node, c.cpus_per_node, c.gpu_memory_gib, c.cpu_memory_gib)
                         for _ in range(c.num_nodes)))

    @classmethod
    def from_ray(cls, nodes: list[dict], gpu_memory_gib: float = 0.0) -> "ClusterSpec":
        """From `ray.nodes()`: the live cluster (a CPU-only head node is simply a node with 0 GPUs)."""
        alive = [n for n in nodes if n.get("Alive", True)]
        return cls(tuple(NodeSpec(int(n["Resources"].get("GPU", 0)), float(n["Resources"].get("CPU", 0)),
                                  gpu_memory_gib, ray_id=n.get("NodeID")) for n in alive))

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)


@dataclass(frozen=True)
class Bundle:
    """One process and what Ray reserves for it. `gpu_ask` is what Ray is asked for (a fraction shares
    a GPU); `gpus` are the planned GPU indices on `node`."""
    roles: tuple[str, ...]
    index: int                 # rank / engine index (the same for every role of a colocated process)
    cpus: float
    gpu_ask: float
    node: int = -1
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class Plan:
    placement: str             # "colocated" | "distributed"
    device: str                # "cuda" | "cpu": the roles' device, decided by the cluster, not the driver
    cluster: ClusterSpec
    bundles: tuple[Bundle, ...]
    engine_sleeps: bool        # colocated on CUDA: the engine sleeps (level 1) while the learner trains. The one
                               # owner: vLLM's sleep mode exists on CUDA only, and only a colocated engine sleeps
    roles: tuple[str, ...]     # the roles this run starts
    memory: dict = field(default_factory=dict)       # (node, gpu) -> [Item]; empty until `budget` ran
    micro_batches: dict = field(default_factory=dict)  # role -> scoring micro-batch (reference, reward)
    # Simulation: Ray's nodes declare logical GPUs on a CPU machine (`ray.cluster_utils.Cluster`). The
    # asks and bundles stay those of the GPU plan; every role computes on CPU with gloo, because an actor
    # holding logical GPUs sees CUDA_VISIBLE_DEVICES set while torch.cuda.is_available() stays false.
    simulated: bool = False
    kv_bytes_per_token: float = 0.0  # per GPU of an engine (filled by `budget`)
    seq_len: int = 0                 # max_prompt_len + max_new_tokens (filled by `budget`)

    def bundles_of(self, role: str) -> list[Bundle]:
        return [b for b in self.bundles if role in b.roles]

    def bundle(self, role: str, index: int = 0) -> Bundle:
        for b in self.bundles:
            if role in b.roles and b.index == index:
                return b
        raise PlanError(f"the plan has no {role} #{index} (roles: {', '.join(self.roles)})")

    def role_device(self, role: str) -> str:
        """cuda only for a role whose process asked for a GPU: Ray hides GPUs from the others."""
        return "cuda" if self.device == "cuda" and self.bundle(role).gpu_ask > 0 and not self.simulated else "cpu"

    def dist_backend(self, role: str) -> str:
        """nccl only where the role really computes on CUDA: tell Ray Train / torch.distributed gloo otherwise."""
        return "nccl" if self.role_device(role) == "cuda" else "gloo"

    def asks(self) -> dict[str, dict[str, float]]:
        """{role: {"CPU": n, "GPU": n}} summed over its processes (a colocated process counts once, under
        its first role)."""
        out = {r: {"CPU": 0.0, "GPU": 0.0} for r in self.roles}
        for b in self.bundles:
            out[b.roles[0]]["CPU"] += b.cpus
            out[b.roles[0]]["GPU"] += b.gpu_ask
        return {r: a for r, a in out.items() if a["CPU"] or a["GPU"]}


def run_roles(cfg: "Config") -> tuple[str, ...]:
    """Roles the RL stage starts. The reference exists only when a KL term needs it, and under LoRA
    without reference.path it is the policy itself (adapter off)."""
    roles = ["policy"] + (["critic"] if cfg.uses_critic else []) + ["generator"]
    ref = cfg.reference
    if (ref.kl_coef > 0 or ref.adaptive_kl) and not (cfg.model.lora.enabled and ref.path is None):
        roles.append("reference")
    return tuple(roles + ["reward"])


def resolve_device(cfg: "Config", cluster: ClusterSpec) -> str:
    want = cfg.cluster.device
    if want == "auto":
        return "cuda" if cluster.gpus > 0 else "cpu"
    if want == "cuda" and cluster.gpus == 0:
        raise PlanError("cluster.device=cuda but the cluster has no GPUs (cluster.gpus_per_node)")
    return want


def _asks(cfg: "Config", roles: tuple[str, ...], device: str) -> list[Bundle]:
    r, p = cfg.rollout, cfg.rl.policy
    gpu = (lambda x: x) if device == "cuda" else (lambda x: 0.0)  # noqa: E731 - CPU runs ask for no GPU
    if cfg.cluster.placement == "colocated":
        if device == "cuda" and p.gpus_per_rank <= 0:
            raise PlanError("cluster.placement=colocated on cuda: rl.policy.gpus_per_rank must be > 0 "
                            "(each process holds a policy rank and its engine on one GPU)")
        if r.tensor_parallel_size > 1:
            raise PlanError("cluster.placement=colocated runs one in-process engine per device, so "
                            f"rollout.tensor_parallel_size must be 1, got {r.tensor_parallel_size}; "
                            "use cluster.placement=distributed for tensor-parallel engines")
        return [Bundle(roles, i, p.cpus_per_rank, gpu(p.gpus_per_rank)) for i in range(p.num_ranks)]
    if device == "cuda":
        if r.tensor_parallel_size > 1 and r.gpus_per_engine != r.tensor_parallel_size:
            raise PlanError(f"rollout.gpus_per_engine={r.gpus_per_engine:g} must equal rollout.tensor_parallel_size="
                            f"{r.tensor_parallel_size}: each tensor-parallel worker owns one GPU of the engine")
        for key, ask in (("rl.policy.gpus_per_rank", p.gpus_per_rank), ("rollout.gpus_per_engine", r.gpus_per_engine),
                         ("rl.critic.gpus_per_rank", cfg.rl.critic.gpus_per_rank if "critic" in roles else 0.5),
                         ("reference.num_gpus", cfg.reference.num_gpus), ("reward.num_gpus", cfg.reward.num_gpus)):
            if ask > 1 and (key != "rollout.gpus_per_engine" or ask != int(ask)):
                raise PlanError(f"{key}={ask:g}: one process of this role uses at most one GPU"
                                + (" (a whole number for a TP engine)" if key.startswith("rollout") else ""))
        for key, ask in (("rl.policy.gpus_per_rank", p.gpus_per_rank), ("rollout.gpus_per_engine", r.gpus_per_engine)):
            if ask <= 0:
                raise PlanError(f"{key}=0 on cluster.device=cuda: Ray hides the GPUs from an actor that asks "
                                f"for none, so this role could not use one")
    out = [Bundle(("policy",), i, p.cpus_per_rank, gpu(p.gpus_per_rank)) for i in range(p.num_ranks)]
    if "critic" in roles:
        c = cfg.rl.critic
        out += [Bundle(("critic",), i, c.cpus_per_rank, gpu(c.gpus_per_rank)) for i in range(c.num_ranks)]
    out += [Bundle(("generator",), i, r.cpus_per_engine, gpu(r.gpus_per_engine)) for i in range(r.num_engines)]
    if "reference" in roles:
        out.append(Bundle(("reference",), 0, cfg.reference.num_cpus, gpu(cfg.reference.num_gpus)))
    out.append(Bundle(("reward",), 0, cfg.reward.num_cpus, gpu(cfg.reward.num_gpus)))
    return out


def _pack(asks: list[Bundle], cluster: ClusterSpec) -> list[Bundle]:
    free_gpu = [[1.0] * n.gpus for n in cluster.nodes]
    free_cpu = [n.cpus if n.cpus is not None else float("inf") for n in cluster.nodes]
    eps = 1e-9
    order = sorted(range(len(asks)), key=lambda k: (-(asks[k].gpu_ask >= 1), -asks[k].gpu_ask))
    placed: dict[int, Bundle] = {}
    for k in order:
        b = asks[k]
        choice = None
        if b.gpu_ask >= 1:
            need = int(b.gpu_ask)
            for n, gpus in enumerate(free_gpu):
                whole = [g for g, f in enumerate(gpus) if f >= 1 - eps]
                if len(whole) >= need and free_cpu[n] >= b.cpus - eps:
                    choice = (n, tuple(whole[:need]))
                    break
        elif b.gpu_ask > 0:  # best fit: the fullest GPU that still holds the fraction
            fits = [(f, n, g) for n, gpus in enumerate(free_gpu) for g, f in enumerate(gpus)
                    if f >= b.gpu_ask - eps and free_cpu[n] >= b.cpus - eps]
            if fits:
                _, n, g = min(fits)
                choice = (n, (g,))
        else:
            n = next((n for n in range(len(free_cpu)) if free_cpu[n] >= b.cpus - eps), None)
            choice = None if n is None else (n, ())
        if choice is None:
            _unplaceable(b, cluster, free_gpu, free_cpu)
        n, gpus = choice
        free_cpu[n] -= b.cpus
        for g in gpus:
            free_gpu[n][g] -= min(b.gpu_ask, 1.0)
        placed[k] = Bundle(b.roles, b.index, b.cpus, b.gpu_ask, n, gpus)
    return [placed[k] for k in range(len(asks))]


def _unplaceable(b: Bundle, cluster: ClusterSpec, free_gpu, free_cpu) -> None:
    what = f"{b.gpu_ask:g} GPU(s) and {b.cpus:g} CPU(s) on one node" if b.gpu_ask else f"{b.cpus:g} CPU(s)"
    left = "; ".join(f"node {n}: {sum(g):g} GPU" + (f", {c:g} CPU" if c != float("inf") else "") + " free"
                     for n, (g, c) in enumerate(zip(free_gpu, free_cpu)))
    raise PlanError(f"{'+'.join(b.roles)} #{b.index} asks for {what}, which the cluster "
                    f"({len(cluster.nodes)} node(s), {cluster.gpus} GPUs) no longer has after the larger asks "
                    f"({left})")


def place(cfg: "Config", cluster: Optional[ClusterSpec] = None, simulate: Optional[bool] = None) -> Plan:
    """Resources only (no model files read): fast enough for the CLI's preflight. `simulate` (default
    cluster.simulate): the same placement on logical GPUs, every role computing on CPU (`Plan.simulated`)."""
    simulate = cfg.cluster.simulate if simulate is None else simulate
    cluster = cluster or ClusterSpec.from_config(cfg.cluster)
    device = resolve_device(cfg, cluster)
    roles = run_roles(cfg)
    if cfg.rollout.quantization not in ("auto", "none") and (device != "cuda" or simulate):
        raise PlanError(f"rollout.quantization={cfg.rollout.quantization} needs a CUDA engine (vLLM's CPU backend has "
                        f"no online fp8) but the generator computes on cpu" + (" (--simulate)" if simulate else "")
                        + "; use rollout.quantization=auto")
    if (block := cfg.rollout.kv_block_size) is not None:
        from rlhf_ray.utils.device import KV_BLOCK_MULTIPLE  # torch: only for a config that sets the block
        engine_device = "cpu" if simulate else device
        if block % KV_BLOCK_MULTIPLE[engine_device]:
            raise PlanError(f"rollout.kv_block_size={block}: vLLM's {engine_device} attention takes multiples of "
                            f"{KV_BLOCK_MULTIPLE[engine_device]} tokens; leave it unset for the device's default")
    bundles = _pack(_asks(cfg, roles, device), cluster)
    return Plan(cfg.cluster.placement, device, cluster, tuple(bundles),
                engine_sleeps=cfg.cluster.placement == "colocated" and device == "cuda" and not simulate, roles=roles,
                simulated=simulate)


def role_dtype(cfg: "Config", plan: Plan, role: str) -> str:
    """The dtype a role loads its model in: the configured one, else bf16 on a GPU and fp32 on CPU (a CPU
    config's auto is resolved from the measured capability as it loads: `Config._measured_dtype`)."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "bfloat16" if plan.role_device(role) == "cuda" else "float32"


def engine_quantization(cfg: "Config", plan: Plan) -> Optional[str]:
    """The generator's online quantization (`rollout.quantization`; auto: fp8 under a 4-bit policy on a GPU,
    `rlhf_ray.roles.generator.engine.quantization_for`). vLLM 0.32 has no NF4 (bitsandbytes): the engine holds the
    learner's dequantized base, in fp8 on a GPU (half the bf16 footprint, what makes an 8B QLoRA run fit a
    24 GB card)."""
    from rlhf_ray.roles.generator.engine import quantization_for
    q = cfg.rollout.quantization
    if q == "auto":
        return quantization_for(plan.role_device("generator"), cfg.model.quantization.load_in_4bit)
    return None if q == "none" else q
