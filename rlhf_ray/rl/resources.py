"""What the RL actor graph asks of the cluster, checked against what the cluster has before any actor
starts: a role that cannot be placed would otherwise wait forever without a word."""
from __future__ import annotations

from rlhf_ray.config import Config
from rlhf_ray.errors import RunError

REFERENCE_CPUS = 0.5


class ClusterTooSmallError(RunError):
    """The roles ask for more CPUs or GPUs than the Ray cluster has."""


def resource_asks(cfg: Config) -> dict[str, dict[str, float]]:
    """{role: {"CPU": n, "GPU": n}} for every actor the RL stage starts."""
    r, p = cfg.rollout, cfg.rl.policy
    if cfg.cluster.placement == "colocated":  # every role inside the policy ranks' processes
        return {"rl.policy": {"CPU": p.num_ranks * p.cpus_per_rank, "GPU": p.num_ranks * p.gpus_per_rank}}
    asks = {"rl.policy": {"CPU": p.num_ranks * p.cpus_per_rank, "GPU": p.num_ranks * p.gpus_per_rank},
            "rollout": {"CPU": r.num_engines * r.cpus_per_engine,
                        "GPU": r.num_engines * r.gpus_per_engine * r.tensor_parallel_size},
            "reward": {"CPU": cfg.reward.num_cpus, "GPU": cfg.reward.num_gpus}}
    if cfg.uses_critic:
        c = cfg.rl.critic
        asks["rl.critic"] = {"CPU": c.num_ranks * c.cpus_per_rank, "GPU": c.num_ranks * c.gpus_per_rank}
    if not (cfg.model.lora.enabled and cfg.reference.path is None):
        asks["reference"] = {"CPU": REFERENCE_CPUS, "GPU": 0.0}
    return asks


def check_fits(cfg: Config, available: dict[str, float]) -> None:
    asks = resource_asks(cfg)
    for kind in ("CPU", "GPU"):
        need = sum(a[kind] for a in asks.values())
        have = float(available.get(kind, 0.0))
        if need > have + 1e-9:
            detail = ", ".join(f"{role} {a[kind]:g}" for role, a in asks.items() if a[kind])
            raise ClusterTooSmallError(
                f"the RL roles ask for {need:g} {kind}s ({detail}) but the Ray cluster has {have:g}; lower the "
                f"cpus_per_*/gpus_per_*/num_* settings or start Ray with more (`ray start --num-cpus N`)")
