"""Starting or joining Ray, with the environment every role's process needs.

`cluster.address`: `local` starts a private Ray on this machine (and stops it at the end); `auto` joins
the cluster this process runs in (the `ray job submit` case); anything else is passed to `ray.init`.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
from contextlib import contextmanager
from typing import Optional

from rlhf_ray.config import ClusterConfig
from rlhf_ray.utils.env import environ_for
from rlhf_ray.utils.net import free_port

# Every role process: no hub access, quiet tokenizers, and idle OpenMP threads that spin briefly, then sleep.
# OpenMP's default spin (about 3 ms, libgomp) lets an idle role steal the cores from the busy one: with two
# processes on the cores it stalled a small model's pass 3-20x. Sleeping at once (PASSIVE) pays a wake-up in
# every parallel region instead, and a small model runs thousands of them: the tiny model's bf16 update took
# 124 ms against 80 ms with a 1,000-iteration spin (about 10 us, libgomp's own unit), alone on 2 cores. Two
# such updates at once on the same 2 cores took 140 ms each PASSIVE, 184 ms with this spin and 650 ms with a
# 10,000 one: the short spin wins where a role has its cores (the plan's aim), and loses little where it has
# not. ACTIVE only names the policy; GOMP_SPINCOUNT bounds it, also where libgomp counts more OpenMP threads
# than cores (a colocated rank's engine and learner threads each keep a team), where PASSIVE never spins.
ROLE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "ACTIVE",
    "GOMP_SPINCOUNT": "1000",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "RAY_DEDUP_LOGS": "1",
    # The console is the operator's: library load reports, per-actor progress bars and INFO lines from
    # every role would bury the step lines. Warnings and errors still come through.
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}


# Library lines that appear in every run and that no operator can act on, each silenced at its own logger
# (not by level across a whole library, so their real warnings still show):
QUIET_LOGGERS = (
    "bitsandbytes.backends.cpu.ops",   # "Failed to load CPU gemm_4bit_forward from kernels-community": an
                                       # optional kernel package; we keep bitsandbytes on its training kernel
    "torch._library.triton",           # "Triton not available": there is no Triton on CPU
    "ray._private.authentication.authentication_token_setup",  # "Token authentication is enabled for this
                                       # Ray cluster": Ray's default for the private Ray that `local` starts.
                                       # (RAY_AUTH_MODE=token would say so too, but set after `import ray` it
                                       # leaves the driver's cached config without a token.) A driver that
                                       # joins a cluster gets no warning from this logger either way.
)


# A private Ray on this machine (`cluster.address: local`) also gets these. Ray Train's preemption watcher
# follows node draining on a cluster; one machine has no node to drain, and on every start the watcher
# costs an actor and a core_worker error line about its constructor arguments (ray issue 53727).
# Ray Train's controller polls its workers every 2 s by default, and a stage's end (and each checkpoint
# report, a 1-deep hand-over) waits for the next poll: on the demo that was 3 s of an idle machine per
# stage (`make demo` 82-84 s with 2 s, 78 s with 0.25 s). A poll is one call per worker, cheap where one
# machine holds every worker; a cluster keeps Ray's default.
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
# ... and without a GPU, vLLM's CPU worker logs "NUMA binding: Using MEMBIND policy" through torch's C++ log
# at WARNING in every engine start; no Python logger or option reaches it. ERROR keeps torch's C++ errors
# (Python-side torch warnings are Python warnings, not this log). GPU runs keep the C++ warnings (NCCL's).
# vLLM's sampler compiles one small kernel with torch.compile (counting the tokens ranked above each sampled
# one, for the log-probs the weight-sync check reads) on an engine's first generation: 1.9 s of the demo's
# first RL step (2.3 s, then 0.4 s), every run, for a count that eager mode does in microseconds on a CPU.
# An engine that decodes compiled (`rollout.enforce_eager` unset: vLLM's default) turns dynamo on again in its
# own process (`generator.engine.compile_env`); `TORCHDYNAMO_DISABLE=0` in the operator's environment wins.
# glibc serves a block over its mmap threshold (32 MiB at most) from a fresh mapping and unmaps it when freed,
# so each step's large tensors (SmolLM2's 1,536 x 49,152 fp32 logits and their gradient, 302 MB each; vLLM's
# logits) are page-faulted in anew every time: 302 MB took 120-160 ms to fill fresh against 25-35 ms reused
# (a 2-core AMD EPYC Zen 3 VM), and a SmolLM2 LoRA update swung 11.8-17.6 s. With mmap off and the heap never
# trimmed, a freed block is reused: the same run's update 9.3-12.2 s and its generation 8.3 s against 9.1 s,
# its resident memory level over 12 steps (8.4-8.8 GB). The cost: a role process keeps its peak heap.
LOCAL_CPU_ENV = {"TORCH_CPP_LOG_LEVEL": "ERROR", "TORCHDYNAMO_DISABLE": "1",
                 "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def quiet_libraries() -> None:
    """In the driver and (through `setup_role_process`) every role process. DeepSpeed's "Setting accelerator
    to CPU" is avoided where the device is known (`Learner` sets DS_ACCELERATOR)."""
    import logging
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def setup_role_process() -> None:
    """Ray's `worker_process_setup_hook`: runs first in every worker process of our job.

    Also pins RAY_ADDRESS to this process's own cluster: Ray Train's placement-group cleaner looks the
    cluster up by scanning the machine, and fails with a traceback where several Ray instances run on one
    machine (a shared workstation, CI)."""
    import ray
    import wrapt
    quiet_role_process()
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    # The tensor wire as the process imports torch (at once where it already has): Ray's own actors in our
    # job (Ray Train's controller and its helpers, queues) never touch a tensor, and importing torch for
    # them cost each one about 1.8 of its 2.8 CPU-seconds to start (a 2-core AMD EPYC).
    wrapt.register_post_import_hook(lambda _torch: install_tensor_wire(), "torch")


def install_tensor_wire() -> None:
    """`rlhf_ray.utils.wire`: imported here, not at the top, so that importing this module imports no torch."""
    from rlhf_ray.utils import wire
    wire.install()


# GPU device nodes of the NVIDIA and AMD drivers: where none exists, every engine here is vLLM's CPU one.
GPU_DEVICES = ("/dev/nvidiactl", "/dev/kfd")


def quiet_role_process() -> None:
    """`quiet_libraries`, and on a machine without a GPU, torch's C++ warnings off (LOCAL_CPU_ENV's
    TORCH_CPP_LOG_LEVEL) for a cluster too. vLLM's CPU worker calls `init_cpu_memory_env` as it starts, which
    warns "NUMA binding: Using MEMBIND policy ..." through torch's C++ log, in every engine start of every
    run. A joined cluster (`ray job submit`, `launch/submit.sh`) does not get LOCAL_CPU_ENV: the driver
    cannot know its nodes' devices, but each role process can see its own machine's. torch reads the level
    once, as it is imported: this runs before a role imports torch, and an operator's own value wins."""
    quiet_libraries()
    if not any(os.path.exists(d) for d in GPU_DEVICES):
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", LOCAL_CPU_ENV["TORCH_CPP_LOG_LEVEL"])


def local_env(cuda: bool) -> dict[str, str]:
    """What a private Ray adds to ROLE_ENV: LOCAL_ENV, and LOCAL_CPU_ENV on a machine without CUDA."""
    return {**LOCAL_ENV, **({} if cuda else LOCAL_CPU_ENV)}


def role_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """ROLE_ENV and `extra`, where the operator's own environment wins (e.g. VLLM_LOGGING_LEVEL=INFO or
    TORCH_CPP_LOG_LEVEL=WARNING to debug)."""
    env = {k: os.environ.get(k, v) for k, v in {**ROLE_ENV, **(extra or {})}.items()}
    for key in ("RLHF_RAY_CACHE", "TORCH_EXTENSIONS_DIR", "VLLM_CPU_KVCACHE_SPACE", "PYTHONPATH"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt: every `finally` on the way out
    runs (actors stopped, Ray shut down), and no `except Exception` turns it into a step error."""
    signum = signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated()


def stop_on_sigterm() -> None:
    """The console script's SIGTERM handling (a scheduler's stop, `kill`, `timeout`): as Ctrl-C."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def _sigterm_back_to_python(before) -> None:
    """`ray.init` replaces the process's SIGTERM handling twice: a Python handler that exits with status 15,
    and, as the driver's core worker starts, Ray's C++ failure signal handler (absl's, installed by
    `RayLog::InstallFailureSignalHandler`), which prints `*** SIGTERM received ...` and a stack dump from
    logging.cc to the console, then aborts. Putting the Python handler back (`before`, the one the process
    had, else Ray's) hands SIGTERM to Python again; crash signals (SIGSEGV, SIGABRT, ...) keep Ray's dump."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, before if callable(before) else signal.getsignal(signal.SIGTERM))


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


DAEMONS_TEMP_PREFIX = "rlhf_ray_d"
# The forkserver listens on <folder>/pymp-XXXXXXXX/listener-XXXXXXXX (32 characters below the folder), and a Unix
# socket's path holds at most 107 bytes: with the folder's own name (prefix, pid, "_", mkdtemp's 8 random
# characters) the base must stay short.
_SOCKET_PATH_MAX, _BELOW_FOLDER, _MKDTEMP_RANDOM = 107, 32, 8


def daemons_temp_folder(worker_env: dict[str, str]) -> Optional[str]:
    """A temp folder for the daemons a local `ray.init` starts, removed after `ray.shutdown`.

    Ray 2.60's dashboard runs its modules from a multiprocessing forkserver, whose folder (`pymp-*` with a
    listening socket, in the dashboard's temp folder) outlives the dashboard that `ray.shutdown` kills: every
    local run with an offline stage left one in /tmp. Ray's own session folder keeps its place (`ray_session`
    names it to `ray.init` from TMPDIR as it was), and the job's workers, roles and Ray Train's actors alike,
    get the temp folder back through `worker_env` (the job's env_vars, which win over the raylet's
    environment they would otherwise inherit).
    None where the base temp folder's path is too long for the sockets below the new folder (the dashboard
    would fail to start): the daemons then keep the temp folder they had."""
    import tempfile

    from rlhf_ray.utils.folders import process_scratch
    base = tempfile.gettempdir()
    name = len(f"{DAEMONS_TEMP_PREFIX}{os.getpid()}_") + _MKDTEMP_RANDOM
    if len(base) + 1 + name + _BELOW_FOLDER > _SOCKET_PATH_MAX:
        return None
    worker_env.setdefault("TMPDIR", base)
    return str(process_scratch(base, DAEMONS_TEMP_PREFIX))


@contextmanager
def ray_session(cfg: ClusterConfig, dashboard: bool = True):
    """Yield with Ray initialised; shut down only what this call started. `dashboard`: start a private local
    Ray with its dashboard (Ray Train's stages need it; it costs a local start about 3 s and a dozen processes)."""
    import ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A raylet this process starts (local, simulated) would start idle Python workers as the first driver
    # connects, in the job's default environment: every role is an actor with a runtime env of its own, so none
    # of them is ever used (measured: 2 idle workers a node, about 1 CPU-second of a tiny run's 25). A joined
    # cluster's raylets are started by `ray start` and keep their own setting.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    started = False
    quiet_libraries()
    sigterm = signal.getsignal(signal.SIGTERM)
    if not ray.is_initialized() and cfg.simulate:  # a local multi-node cluster of logical GPUs
        from rlhf_ray.placement.simulate import simulated_cluster
        runtime_env = {"env_vars": role_env(), "worker_process_setup_hook": "rlhf_ray.runtime.setup_role_process"}
        with simulated_cluster(cfg, dict(runtime_env=runtime_env, log_to_driver=True, logging_level="WARNING")):
            _sigterm_back_to_python(sigterm)
            install_tensor_wire()
            yield
        return
    daemons_temp = None
    try:  # (the daemons' folder goes also when ray.init itself fails)
        if not ray.is_initialized():
            local = cfg.address == "local"
            runtime_env = {"env_vars": role_env(local_env(_has_cuda()) if local else None),
                           "worker_process_setup_hook": "rlhf_ray.runtime.setup_role_process"}
            started = True  # (before ray.init: a start that fails halfway stops what it started)
            if local:
                daemons_temp = daemons_temp_folder(runtime_env["env_vars"])
                ncpu = cfg.cpus_per_node or os.cpu_count() or 1
                # Roles reserve fractional CPUs; the logical count is generous so that actors are never
                # left pending on a 2-core laptop: real core sharing is governed by thread counts.
                # address="local": a private instance even when a `ray start` cluster runs on this machine
                # (a bare ray.init() would join that cluster instead).
                # The dashboard serves Ray's job and train state, which Ray Train's placement-group cleaner also
                # polls (without it, it warns every few seconds); a free port, as other Ray instances may hold 8265.
                from ray._common.utils import get_default_ray_temp_dir
                ray_temp = get_default_ray_temp_dir()  # Ray's own folder, from TMPDIR as it was (/tmp/ray)
                with environ_for(**({"TMPDIR": daemons_temp} if daemons_temp else {})):
                    ray.init(address="local", num_cpus=max(ncpu, 4) * 2, include_dashboard=dashboard,
                             dashboard_port=free_port(), runtime_env=runtime_env, _temp_dir=ray_temp,
                             log_to_driver=True, configure_logging=True, logging_level="WARNING")
            else:
                # Inside `ray job submit` the job already has a runtime env (its working dir): combine the
                # two instead of failing on the overlap.
                os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
                ray.init(address=cfg.address, runtime_env=runtime_env, logging_level="WARNING")
            _sigterm_back_to_python(sigterm)
        install_tensor_wire()  # the driver's tensors (batches, sequences) leave as raw bytes, as the roles' do
        yield
    finally:
        if started:
            ray.shutdown()
        if daemons_temp is not None:
            shutil.rmtree(daemons_temp, ignore_errors=True)
