"""The run's preflight: the plan placed on the live Ray cluster before any actor starts (a role that
cannot be placed would otherwise wait forever without a word). The counting is the plan's
(`rlhf_ray.placement.plan`); this module only asks Ray what it has."""
from __future__ import annotations

from typing import Optional

from rlhf_ray.config import Config
from rlhf_ray.errors import RunError
from rlhf_ray.placement.plan import ClusterSpec, NodeSpec, Plan, PlanError, place


class ClusterTooSmallError(RunError):
    """The roles ask for more CPUs or GPUs than the Ray cluster has."""


def resource_asks(cfg: Config) -> dict[str, dict[str, float]]:
    """{role: {"CPU": n, "GPU": n}} for every process the RL stage starts, as the plan counts them."""
    return place(cfg).asks()


def check_fits(cfg: Config, available: Optional[dict] = None, nodes: Optional[list[dict]] = None) -> Plan:
    """The plan on the live cluster: `nodes` as `ray.nodes()` returns them (read from Ray when neither
    argument is given), or `available` totals (`ray.cluster_resources()`) taken as one node."""
    if nodes is None and available is None:
        import ray
        nodes = ray.nodes()
    if nodes is not None:
        cluster = ClusterSpec.from_ray(nodes, cfg.cluster.gpu_memory_gib)
    else:
        cluster = ClusterSpec((NodeSpec(int(available.get("GPU", 0)), float(available.get("CPU", 0)),
                                        cfg.cluster.gpu_memory_gib),))
    try:
        return place(cfg, cluster)
    except PlanError as e:
        asks = place(cfg).asks()  # what the declared cluster would give each role
        need = {k: sum(a[k] for a in asks.values()) for k in ("CPU", "GPU")}
        have = {"CPU": sum(n.cpus or 0 for n in cluster.nodes), "GPU": cluster.gpus}
        detail = "; ".join(f"{role} {a['CPU']:g} CPU {a['GPU']:g} GPU" for role, a in asks.items())
        raise ClusterTooSmallError(
            f"the RL roles ask for {need['CPU']:g} CPUs and {need['GPU']:g} GPUs ({detail}) but the Ray cluster has "
            f"{have['CPU']:g} and {have['GPU']:g} ({e}); lower the cpus_per_*/gpus_per_*/num_* settings or start "
            f"Ray with more (`ray start --num-cpus N`)") from None
