"""Cluster files: KubeRay manifests in step with the GPU configs, token auth on in every launch path,
the dashboard on loopback unless asked."""
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "cluster" / "kuberay"))
import make_manifests  # noqa: E402


def test_kuberay_manifests_are_generated_from_the_configs():
    files = make_manifests.all_files()
    assert len(files) == 2 * len(list((ROOT / "configs" / "gpu").glob("*.yaml"))) >= 6
    for fname, text in files.items():
        assert (ROOT / "cluster" / "kuberay" / fname).read_text() == text, f"rerun make_manifests.py ({fname})"


@pytest.mark.parametrize("path", sorted((ROOT / "cluster" / "kuberay").glob("*.yaml")), ids=lambda p: p.name)
def test_kuberay_cluster_matches_its_config_and_has_token_auth(path):
    from rlhf_ray.config import load_config
    doc = yaml.safe_load(path.read_text())
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    cfg = load_config(ROOT / doc["metadata"]["annotations"]["rlhf-ray/config"])
    assert spec["authOptions"] == {"mode": "token"}
    (group,) = spec["workerGroupSpecs"]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert (group["replicas"], gpus) == (cfg.cluster.num_nodes, cfg.cluster.gpus_per_node)
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"  # the driver's node has no GPU


LAUNCHERS = ["cluster/start_head.sh", "cluster/start_worker.sh", "launch/submit.sh",
             "cluster/onprem-4x8xh100.yaml", "cluster/aws-autoscaler.yaml"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_launch_path_turns_token_auth_on_and_keeps_the_dashboard_local(name):
    text = (ROOT / name).read_text()
    assert "RAY_AUTH_MODE=token" in text
    assert "0.0.0.0" not in text
    if name.endswith(".yaml"):
        starts = yaml.safe_load(text)["head_start_ray_commands"] + yaml.safe_load(text)["worker_start_ray_commands"]
        assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
        assert all("--dashboard-host=127.0.0.1" in c for c in starts if "--head" in c)


# That a head from cluster/start_head.sh refuses a job submission without its token (none, or a wrong one) is
# asserted on e2e/test_job_submit.py's head, beside the submission that carries it.
