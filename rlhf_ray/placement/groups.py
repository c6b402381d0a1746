"""The plan made real on Ray: placed on the live cluster before any actor starts (`check_fits`: a role that
cannot be placed would otherwise wait forever without a word), one STRICT_PACK placement group per planned
node, and the options each role's actor is started with. Nothing here decides a number; it all comes from
the `Plan`. A plan made on
the live cluster (`ClusterSpec.from_ray`) names each node's Ray id, and its group is held to that node:
STRICT_PACK alone keeps a group on one node but lets Ray choose which, so a CPU-only group planned for the
head could land beside another planned node.

    plan = check_fits(cfg)                                   # the plan on the cluster Ray has
    groups = reserve(plan)                                   # waits until every node group is placed
    Actor.options(**actor_options(plan, groups, "policy", rank)).remote(...)
    ...
    release(groups)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from rlhf_ray.errors import RunError
from rlhf_ray.placement.plan import Bundle, ClusterSpec, NodeSpec, Plan, PlanError, place

if TYPE_CHECKING:
    from rlhf_ray.config import Config


class ClusterTooSmallError(RunError):
    """The roles ask for more CPUs or GPUs than the Ray cluster has."""


def check_fits(cfg: "Config", available: Optional[dict] = None, nodes: Optional[list[dict]] = None) -> Plan:
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


def _resources(b: Bundle) -> dict[str, float]:
    return {"CPU": b.cpus, **({"GPU": b.gpu_ask} if b.gpu_ask else {})}  # Ray rejects zero-valued resources


def _node_bundles(plan: Plan, node: int) -> list[Bundle]:
    return [b for b in plan.bundles if b.node == node]


def reserve(plan: Plan, timeout_s: float = 600.0) -> dict[int, object]:
    """{planned node: placement group}. A group that Ray cannot place within `timeout_s` is an error that
    names its roles (instead of actors pending forever)."""
    import ray
    from ray.util.placement_group import NODE_ID_LABEL_KEY, placement_group, remove_placement_group

    def group(n: int):
        bundles = [_resources(b) for b in _node_bundles(plan, n)]
        ray_id = plan.cluster.nodes[n].ray_id
        pinned = {"bundle_label_selector": [{NODE_ID_LABEL_KEY: ray_id}] * len(bundles)} if ray_id else {}
        return placement_group(bundles, strategy="STRICT_PACK", name=f"rlhf-ray-node{n}", **pinned)

    groups = {n: group(n) for n in sorted({b.node for b in plan.bundles})}
    ready, pending = ray.wait([g.ready() for g in groups.values()], num_returns=len(groups), timeout=timeout_s)
    if pending:
        waiting = [n for n, g in groups.items() if g.ready() not in ready]
        for g in groups.values():
            remove_placement_group(g)
        roles = sorted({"+".join(b.roles) for n in waiting for b in _node_bundles(plan, n)})
        raise PlanError(f"Ray could not place planned node(s) {waiting} ({', '.join(roles)}) within {timeout_s:g} s: "
                        f"the cluster has no node with those GPUs and CPUs free (see `ray status`)")
    return groups


def actor_options(plan: Plan, groups: dict, role: str, index: int = 0) -> dict:
    """num_cpus, num_gpus and the placement-group bundle of `role` #index (a colocated process is found
    under any of its roles)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    b = plan.bundle(role, index)
    return dict(num_cpus=b.cpus, num_gpus=b.gpu_ask, scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=groups[b.node], placement_group_bundle_index=_node_bundles(plan, b.node).index(b),
        placement_group_capture_child_tasks=True))


def release(groups: dict) -> None:
    from ray.util.placement_group import remove_placement_group
    for g in groups.values():
        remove_placement_group(g)
