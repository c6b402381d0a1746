"""The GPU configs' real plans on a simulated cluster: a CPU-only head (where the driver runs) and four
nodes declaring 8 logical GPUs each (`ray.cluster_utils.Cluster`). The placement groups and bundles are
the plan's; the actors are tiny stand-ins (the RL roles' own asks are compared with the plan in
test_role_asks.py), so this checks placement, not training. Each stand-in reports where Ray put it and
what it was given."""
import os

import pytest
import ray

from rlhf_ray.config import load_config
from rlhf_ray.placement.groups import actor_options, release, reserve
from rlhf_ray.rl.resources import check_fits

pytestmark = pytest.mark.slow
CONFIGS = ["llama3.1-8b-8xh100.yaml", "llama3.1-70b-4x8xh100.yaml", "llama3.1-8b-qlora-4090.yaml"]


@ray.remote(num_cpus=0)
class StandIn:
    def where(self):
        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), os.environ.get("CUDA_VISIBLE_DEVICES", ""), ctx.get_assigned_resources()


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    saved = os.environ.pop("CUDA_VISIBLE_DEVICES", None)  # add_node(num_gpus=8) refuses a shorter list
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    gpu_nodes = [c.add_node(num_cpus=16, num_gpus=8) for _ in range(4)]
    ray.init(address=c.address)
    try:
        yield c, {n.node_id for n in gpu_nodes}
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


@pytest.mark.parametrize("name", CONFIGS)
def test_every_role_lands_where_the_plan_put_it(cluster, name):
    _, gpu_nodes = cluster
    cfg = load_config(f"configs/gpu/{name}", ["cluster.simulate=true"])
    assert ray.get_runtime_context().get_node_id() not in gpu_nodes  # the driver's node has no GPU
    # the plan on the live cluster, the head listed first (ray.nodes() order varies): CPU-only roles are then
    # planned on the head, which a placement group must honour (STRICT_PACK alone let Ray pick any node)
    plan = check_fits(cfg, nodes=sorted(ray.nodes(), key=lambda n: n["Resources"].get("GPU", 0)))
    assert plan.device == "cuda" and plan.simulated and plan.role_device("policy") == "cpu"  # compute on CPU
    groups = reserve(plan, timeout_s=120)
    try:
        actors = {(b.roles[0], b.index): StandIn.options(**actor_options(plan, groups, b.roles[0], b.index)).remote()
                  for b in plan.bundles}
        seen = dict(zip(actors, ray.get([a.where.remote() for a in actors.values()])))
        node_of = {}
        for b in plan.bundles:
            node, visible, given = seen[(b.roles[0], b.index)]
            assert node_of.setdefault(b.node, node) == node              # one planned node, one Ray node
            assert given.get("GPU", 0) == pytest.approx(b.gpu_ask)      # what Ray gave is what the plan asked
            assert given.get("CPU", 0) == pytest.approx(b.cpus)
            assert len([v for v in visible.split(",") if v]) == (len(b.gpus) if b.gpu_ask else 0)
        # every planned node is the live node the plan read (a CPU-only one may be the head), one each
        assert node_of == {n: plan.cluster.nodes[n].ray_id for n in node_of}
        assert len(set(node_of.values())) == len(node_of)
        assert all(node in gpu_nodes for n, node in node_of.items() if plan.cluster.nodes[n].gpus)
        for a in actors.values():
            ray.kill(a)
    finally:
        release(groups)
