"""Every actor of a real RL role graph asks Ray for exactly its bundle of the plan, under both placements.

The roles are started as `run_rl` starts them (`check_fits` -> `reserve` -> `build_roles`); then the GCS
actor table (what Ray itself recorded for each actor: the resources it required, renamed by Ray to
`CPU_group_<bundle>_<group id>` inside a placement group, and the group) is compared with the plan. An
actor that asks for anything else, sits in another bundle, or exists outside the plan fails the test.
"""
import re

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.models.kit import resolve_model_path
from rlhf_ray.placement.groups import release, reserve
from rlhf_ray.placement.groups import check_fits
from rlhf_ray.placement.shared import Paths
from rlhf_ray.rl.run import build_roles

pytestmark = pytest.mark.slow

VADER = "rlhf_ray.data.builtin_reviews:vader_reward"
# Ray's names for a resource inside a placement group: of bundle k, and of any bundle (the wildcard)
INDEXED, WILDCARD = re.compile(r"^([A-Za-z]+)_group_(\d+)_([0-9a-f]+)$"), re.compile(r"^([A-Za-z]+)_group_([0-9a-f]+)$")


def _config(placement: str):
    return load_config(None, [
        "run.stages=[rl]", f"reward.sources=[{{kind: function, path: '{VADER}'}}]", "algorithm.name=ppo",
        f"cluster.placement={placement}", "rollout.max_new_tokens=8", "data.max_prompt_len=16",
        "rl.policy.cpus_per_rank=1.5", "rl.critic.cpus_per_rank=0.75", "reward.num_cpus=0.25",  # distinct asks
        "rollout.enforce_eager=true"])


@pytest.fixture(scope="module")
def ray6():
    import ray
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2 ** 20, configure_logging=False)
    yield ray
    ray.shutdown()


def recorded_asks() -> dict[str, tuple[str, dict]]:
    """{actor id hex: (placement group id hex, {(resource, bundle index): amount})} of every live actor,
    as the GCS recorded them (`ray._private.state.actors()` leaves these fields out)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    out = {}
    for raw in state._connect_and_get_accessor().get_actor_table(None, "ALIVE"):
        a = gcs_pb2.ActorTableData.FromString(raw)
        asks, pg = {}, a.placement_group_id.hex()
        for name, amount in a.required_resources.items():
            if (w := WILDCARD.match(name)) and w.group(2) == pg:
                continue  # Ray asks the wildcard too, for the same amount
            m = INDEXED.match(name)
            if m and m.group(1) == "bundle" and m.group(3) == pg:
                continue  # Ray's own marker of the bundle (0.001)
            asks[(m.group(1), int(m.group(2))) if m and m.group(3) == pg else (name, None)] = amount
        out[a.actor_id.hex()] = (a.placement_group_id.hex(), asks)
    return out


def planned_asks(plan, groups, role: str, index: int) -> tuple[str, dict]:
    b = plan.bundle(role, index)
    k = [x for x in plan.bundles if x.node == b.node].index(b)
    want = {("CPU", k): b.cpus, **({("GPU", k): b.gpu_ask} if b.gpu_ask else {})}
    return groups[b.node].id.hex(), want


def processes(roles, placement: str) -> list[tuple[str, int, object]]:
    """(planned role, index, actor) of every process the graph started."""
    if placement == "colocated":
        return [("policy", i, a) for i, a in enumerate(roles.ranks)]
    out = [("policy", i, a) for i, a in enumerate(roles.policy.actors)]
    out += [("critic", i, a) for i, a in enumerate(roles.critic.actors)]
    out += [("generator", i, a) for i, a in enumerate(roles.generator.actors)]
    return out + [(r, 0, a) for r, a in (("reference", roles.reference), ("reward", roles.reward)) if a is not None]


def compare(plan, groups, procs, recorded: dict) -> list[str]:
    """Every difference between what Ray recorded and what the plan asked for (empty: they agree)."""
    problems = []
    for role, i, actor in procs:
        got = recorded.pop(actor._actor_id.hex(), None)
        want = planned_asks(plan, groups, role, i)
        if got != want:
            problems.append(f"{role} #{i}: Ray has {got}, the plan asks {want}")
    problems += [f"an actor outside the plan: {got}" for got in recorded.values()]
    return problems


@pytest.mark.parametrize("placement", ["distributed", "colocated"])
def test_every_actor_asks_ray_for_its_planned_bundle(ray6, tmp_path, placement):
    cfg = _config(placement)
    plan = check_fits(cfg)
    assert plan.device == "cpu" and "reference" in plan.roles and "critic" in plan.roles
    groups = reserve(plan, timeout_s=60)
    roles = None
    try:
        init = resolve_model_path("builtin:tiny")
        roles = build_roles(cfg, Paths(init, resolve_model_path, str(tmp_path)), plan, groups, total_updates=2)
        procs = processes(roles, placement)
        assert len(procs) == len(plan.bundles)  # one process per planned bundle
        assert compare(plan, groups, procs, recorded_asks()) == []
        assert roles.backend.device == plan.role_device("policy") and roles.backend.dist_backend == "gloo"
        # the comparison can fail: a process asking for other CPUs, or in another bundle, is named
        role, i, actor = procs[0]
        gid, _ = planned_asks(plan, groups, role, i)
        b_cpus = plan.bundle(role, i).cpus  # the right amount, but outside the placement group
        assert compare(plan, groups, procs, {**recorded_asks(), actor._actor_id.hex(): (gid, {("CPU", 0): 9.0})})
        wrong = {**recorded_asks(), actor._actor_id.hex(): ("", {("CPU", None): b_cpus})}
        assert compare(plan, groups, procs, wrong)
    finally:
        if roles is not None:
            roles.shutdown()
        release(groups)
