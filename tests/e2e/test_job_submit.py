"""`launch/submit.sh` onto a real Ray head started by `cluster/start_head.sh` on this machine, token auth on: the
job runs, and a submission without the head's token (none, or a wrong one) is refused.

The head runs with `--block` in its own process group and its own temp dir, so the test stops exactly
the processes it started and never touches another Ray on the machine.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port, kill_matching, stop_process

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ray_head():
    bindir = str(Path(sys.executable).parent)
    temp = tempfile.mkdtemp(prefix="rrj", dir="/tmp")  # short: Ray's unix sockets live under it
    gcs, dash = free_port(), free_port()
    # Every port of its own: a default one (e.g. the dashboard agent's 52365) may be taken by another Ray.
    ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port"]
    port_args = [x for flag in ports for x in (flag, str(free_port()))]
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(["bash", str(ROOT / "cluster" / "start_head.sh"), "--port", str(gcs), "--dashboard-port",
                             str(dash), "--block", "--temp-dir", temp, "--num-cpus", "8", *port_args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            httpx.get(url + "/api/version", timeout=2)
            break
        except httpx.HTTPError:
            if head.poll() is not None:
                pytest.fail("the Ray head exited during start-up")
            time.sleep(1)
    else:
        pytest.fail("the Ray dashboard did not come up in 120 s")
    try:
        yield url, env
    finally:
        # `ray start --block` answers SIGTERM by stopping its daemons one after another, each given its grace
        # (33 s here, most of it the GCS); the test's own head holds nothing worth a graceful stop
        stop_process(head, timeout=5, whole_group=True)
        leftover = kill_matching(temp)
        shutil.rmtree(temp, ignore_errors=True)
        assert not leftover, f"Ray processes of the test head outlived it: {leftover}"


def test_submit_runs_the_pipeline_as_a_ray_job(ray_head, tmp_path):
    url, env = ray_head
    out = tmp_path / "job"
    p = subprocess.run(["bash", "launch/submit.sh", "--address", url, "configs/quickstart.yaml", "run.stages=[rl]",
                        "rl.steps=2", "rl.save_every=0", f"run.output_dir={out}", "logging.report=false",
                        "reward.sources=[{kind: function, path: 'rlhf_ray.data.builtin_reviews:vader_reward'}]"],
                       cwd=ROOT, env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "succeeded" in p.stdout.lower()
    assert (out / "rl" / "model" / "config.json").exists()
    # the same head refuses a submission without its token: none (a home of its own, no RAY_AUTH_*), or a wrong one
    stranger = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path / "stranger")}
    (tmp_path / "stranger").mkdir()
    submit = ["ray", "job", "submit", "--address", url, "--", "echo", "hi"]
    for extra in ({}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x" * 32}):
        refused = subprocess.run(submit, env=stranger | extra, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower(), refused.stderr[-2000:]


def test_submit_refuses_a_bad_config_before_uploading(tmp_path):
    p = subprocess.run(["bash", "launch/submit.sh", "--address", "http://127.0.0.1:9", "configs/quickstart.yaml",
                        "rollout.temprature=2"], cwd=ROOT, env={**os.environ, "PYTHON": sys.executable},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "did you mean 'temperature'" in p.stderr
