"""Cluster files: KubeRay manifests in step with the GPU configs, token auth on in every launch path,
the dashboard on loopback unless asked; and a Ray head from cluster/start_head.sh refuses a job
submission that carries no token."""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rlhf_ray.utils.net import free_port
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "cluster" / "kuberay"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
import make_manifests  # noqa: E402
from helpers import kill_matching, stop_process  # noqa: E402


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


@pytest.mark.slow
def test_an_unauthenticated_job_submission_is_refused(tmp_path):
    bindir = str(Path(sys.executable).parent)
    temp = tempfile.mkdtemp(prefix="rra", dir="/tmp")  # short: Ray's unix sockets live under it
    head_home, stranger_home = tmp_path / "head", tmp_path / "stranger"
    head_home.mkdir(), stranger_home.mkdir()
    dash = free_port()
    ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base.update(PATH=bindir + os.pathsep + os.environ["PATH"], RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen(["bash", str(ROOT / "cluster/start_head.sh"), "--port", str(free_port()), "--dashboard-port",
                             str(dash), "--block", "--temp-dir", temp, "--num-cpus", "1",
                             *[x for f in ports for x in (f, str(free_port()))]],
                            env={**base, "HOME": str(head_home)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash}"

    def ray_cli(home, *args, **env):
        return subprocess.run(["ray", *args], env={**base, "HOME": str(home), **env}, capture_output=True,
                              text=True, timeout=120)
    try:
        deadline = time.time() + 120
        while ray_cli(head_home, "job", "list", "--address", url, RAY_AUTH_MODE="token").returncode != 0:  # the head's token
            assert head.poll() is None and time.time() < deadline, "the Ray head did not come up"
            time.sleep(2)
        assert (head_home / ".ray" / "auth_token").exists()
        submit = ["job", "submit", "--address", url, "--", "echo", "hi"]
        for refused in (ray_cli(stranger_home, *submit),                               # no token at all
                        ray_cli(stranger_home, *submit, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="x" * 32)):  # wrong one
            assert refused.returncode != 0
            assert "auth" in (refused.stdout + refused.stderr).lower(), refused.stdout + refused.stderr
    finally:
        stop_process(head, timeout=60, whole_group=True)
        kill_matching(temp)
