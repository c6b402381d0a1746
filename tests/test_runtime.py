"""The environment every role process gets: what a private Ray adds, and the operator's own values winning."""
import os
import subprocess
import sys

from rlhf_ray.runtime import LOCAL_CPU_ENV, ROLE_ENV, local_env, role_env


def _python(script: str, env: dict) -> str:
    """What `script` prints, run by a fresh interpreter in exactly `env` (its variables read as it starts)."""
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          check=True).stdout


def test_a_private_ray_without_cuda_quiets_torchs_cpp_log_and_the_preemption_watcher():
    env = role_env(local_env(cuda=False))
    assert env["TORCH_CPP_LOG_LEVEL"] == "ERROR" and env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert ROLE_ENV.items() <= env.items()


def test_gpu_and_joined_clusters_keep_torchs_cpp_warnings():
    assert "TORCH_CPP_LOG_LEVEL" not in role_env(local_env(cuda=True))     # NCCL's warnings stay visible
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in role_env()           # a cluster has nodes to drain


def test_the_operators_environment_wins(monkeypatch):
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")
    env = role_env(local_env(cuda=False))
    assert env["TORCH_CPP_LOG_LEVEL"] == "WARNING" != LOCAL_CPU_ENV["TORCH_CPP_LOG_LEVEL"]
    assert env["VLLM_LOGGING_LEVEL"] == "INFO"


def test_a_private_ray_polls_ray_trains_workers_sooner_than_rays_default():
    """A stage's end and each checkpoint hand-over wait for the controller's next poll; the name must be the
    one Ray Train reads (a renamed variable in a Ray upgrade would silently bring the 2 s back)."""
    from ray.train.v2._internal.constants import DEFAULT_HEALTH_CHECK_INTERVAL_S, HEALTH_CHECK_INTERVAL_S_ENV_VAR
    local = role_env(local_env(cuda=False))
    assert float(local[HEALTH_CHECK_INTERVAL_S_ENV_VAR]) < DEFAULT_HEALTH_CHECK_INTERVAL_S
    assert HEALTH_CHECK_INTERVAL_S_ENV_VAR not in role_env()  # a cluster keeps Ray's default


def test_a_private_ray_without_cuda_runs_vllms_sampler_kernel_eagerly(monkeypatch):
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)  # the suite's own setting (conftest.py)
    assert role_env(local_env(cuda=False))["TORCHDYNAMO_DISABLE"] == "1"
    assert "TORCHDYNAMO_DISABLE" not in role_env(local_env(cuda=True))  # a GPU keeps the compiled kernel


IDLE_CPU_S = """
import time, torch
torch.set_num_threads(2)
a = torch.randn(512, 512)
for _ in range(20):
    a @ a                      # parallel regions: an OpenMP team now waits for the next one
t0 = time.process_time()
time.sleep(0.5)                # idle: a thread still spinning would burn this process's CPU here
print(time.process_time() - t0)
"""


def test_an_idle_role_process_stops_spinning_at_once():
    """Role processes spin briefly between parallel regions (a small model's ops come microseconds apart) but
    must not keep a core busy once idle: OMP_WAIT_POLICY=ACTIVE without a bounded GOMP_SPINCOUNT spins for
    minutes, stealing the cores from the role whose turn it is."""
    env = {**os.environ, **{k: v for k, v in ROLE_ENV.items() if k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}}
    assert float(_python(IDLE_CPU_S, env).strip()) < 0.1  # of 0.5 s idle


REUSE = """
import resource
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = bytearray(256 << 20)   # a large block, written (a step's logits, their gradient)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""


def test_a_cpu_role_process_reuses_a_freed_large_block_instead_of_faulting_in_fresh_pages():
    """glibc maps a large block afresh on every allocation and unmaps it on free: each step's logits would be
    page-faulted in again (65,536 4-KiB pages for this block). A CPU run's role processes keep it."""
    malloc = {k: v for k, v in role_env(local_env(cuda=False)).items() if k.startswith("MALLOC_")}
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    plain, role = (int(_python(REUSE, {**base, **extra})) for extra in ({}, malloc))
    assert plain > 30_000  # the default: faulted in again
    assert role < 3_000, role
    assert not any(k.startswith("MALLOC_") for k in role_env(local_env(cuda=True)))  # a GPU node keeps glibc's own
