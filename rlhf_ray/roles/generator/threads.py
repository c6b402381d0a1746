"""Thread budget of a generator engine, so that it and a learner on the same node do not oversubscribe.

Measured on the 2-core CI machine (STACK.md: two torch processes on 2 cores slowed a step 9x):
- In-process vLLM (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, used whenever tensor_parallel_size == 1) runs
  its kernels on torch's intra-op pool, sized by OMP_NUM_THREADS at engine start (vLLM otherwise
  drops torch to 1 thread "for serving", and forbids `torch.set_num_threads` afterwards). We set it
  to the engine's Ray CPU share, `rollout.cpus_per_engine`, so Ray's accounting is the thread budget.
- VLLM_CPU_OMP_THREADS_BIND=nobind: vLLM's "auto" binding (multiprocess mode) pins workers to every
  core of a NUMA node, including the cores Ray gave the learner. VLLM_CPU_NUM_OF_RESERVED_CPU=0: no
  core is held back for a scheduler process that in-process mode does not have.
"""
from __future__ import annotations

import math


def engine_threads(cpus_per_engine: float) -> int:
    return max(1, int(cpus_per_engine))


def engine_env(rollout_cfg) -> dict[str, str]:
    """Environment for a process that hosts one engine (Ray `runtime_env` env_vars, or os.environ)."""
    threads = str(engine_threads(rollout_cfg.cpus_per_engine))
    return {
        "OMP_NUM_THREADS": threads,
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(math.ceil(rollout_cfg.kv_cache_gib)),  # vLLM parses whole GiB
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if rollout_cfg.tensor_parallel_size == 1 else "1",
        "TOKENIZERS_PARALLELISM": "false",
        # a compiled engine (`rollout.enforce_eager` unset) keeps its graph in torch's own compile cache: vLLM
        # 0.32's AOT artifact, its default under torch >= 2.10, fails to load under torch 2.13 ("'function'
        # object has no attribute 'finalize_loading'"), so every start compiled it again (tiny model: engine
        # start 30 s against 18 with it off)
        "VLLM_USE_AOT_COMPILE": "0",
    }
