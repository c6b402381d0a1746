"""Weight-sync time vs model size, full and adapter-only, next to the machine's memory-copy bound.

    python benchmarks/sync_bench.py [--models tiny smollm2-135m] [--repeats 5] [--out sync_bench.json]

For each model: one generator engine (a Ray actor, LoRA enabled so both modes run on one engine), a
plain HF model (+ peft LoRA on q/k/v/o, r=8) in a learner stand-in actor of its own (`HeldWeights`: the
two calls a sync makes of a learner rank, its weights handed out by the learner's own `full_weights`). A
sync is timed end to end (pack into buckets, put into the object store, engine fetches, vLLM reloads,
prefix cache reset, actor round trip), median of `repeats`, for each restore point
(`rlhf_ray.sync.streamed`): "learner" (lockstep runs: nothing kept) and "disk" (runs whose rollouts may
lag: each bucket also written to the learner's disk); then the syncs of a LoRA learner: the adapter (a GPU
engine's) and the merged layers that training changes (a CPU engine's: `lora_*`). `inproc_*`: the
colocated placement's sync (`rlhf_ray.sync.in_process.hand_over`, learner and engine in one process, the
single machine's default), whole model and LoRA. The bound is bytes / memcpy bandwidth, memcpy measured on
a 512 MiB torch copy in this process; `*_vs_bound` divides by the whole model's bound, `*_vs_sent_bound` by
that of the bytes the sync carries. Targets (project brief): full sync <= 3x the bound; adapter >= 10x
faster. Run it alone: two processes on 2 cores slow each other (STACK.md).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

import torch

from rlhf_ray.utils.capability import describe, machine_record


def memcpy_gbps(nbytes: int = 512 * 2 ** 20, repeats: int = 5) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch pages
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def vllm_ready(path: str) -> str:
    """The built-in SmolLM2 folder keeps a GGUF `quantization_config` in config.json that vLLM rejects
    (the weights are plain fp32); serve a symlinked copy without it. Reported to the model kit's owner."""
    import tempfile
    from pathlib import Path

    config = json.loads((Path(path) / "config.json").read_text())
    if "quantization_config" not in config:
        return path
    config.pop("quantization_config")
    out = Path(tempfile.mkdtemp(prefix="rlhf_ray_vllm_model_"))
    for f in Path(path).iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


class HeldWeights:
    """A learner rank's part in a sync, in a process of its own: `named_weights(mode, frozen)` and `updates()`."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(2)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        # A learner's weights live in anonymous memory after its first optimizer step; fresh from
        # from_pretrained they map the safetensors file and every read pays page-cache faults.
        with torch.no_grad():
            for p in self.model.parameters():
                p.data = p.data.clone()

    def named_weights(self, mode: str, frozen: bool = True):
        from rlhf_ray.learner.build import unwrap_peft
        from rlhf_ray.learner.weights import adapter_weights, full_weights
        if mode == "full":
            return full_weights(unwrap_peft(self.model), torch.float32, frozen)
        return adapter_weights(self.model)

    def updates(self) -> int:
        return 0

    def step(self) -> None:
        """What an optimizer step does to the weights a sync reads: the trained ones change."""
        with torch.no_grad():
            for p in self.model.parameters():
                if p.requires_grad:
                    p.add_(1e-6)

    def sizes(self, skip, mode: str = "full") -> tuple[int, int]:
        """(parameters, bytes of a sync in `mode`)."""
        return (sum(p.numel() for p in self.model.parameters()),
                sum(t.numel() * t.element_size() for n, t in self.named_weights(mode, frozen=False) if n not in skip))

    def add_adapter(self) -> dict:
        """LoRA r=8 on q/k/v/o (B random, so that merging changes the layers); returns its peft config."""
        from peft import LoraConfig, get_peft_model
        self.model = get_peft_model(self.model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        return self.model.peft_config["default"].to_dict()


class Colocated(HeldWeights):
    """The colocated placement's sync: this process's learner weights into an engine in this process."""

    def __init__(self, path: str, engine_path: str):
        from rlhf_ray.config.schema import RolloutConfig
        from rlhf_ray.roles.generator.engine import GeneratorEngine
        from rlhf_ray.roles.generator.group import tied_names
        from rlhf_ray.utils.device import resolve_backend
        super().__init__(path)
        self.engine = GeneratorEngine(engine_path, RolloutConfig(max_new_tokens=8), resolve_backend("cpu", "float32"),
                                      lora=False, max_model_len=256)
        self.skip, self.version = tied_names(path), 0

    def pushes(self, repeats: int) -> list[float]:
        """Seconds of each of `repeats` syncs after the first (vLLM's reload, checking the in-place loader)."""
        from rlhf_ray.sync.in_process import hand_over
        out = []
        for _ in range(repeats + 1):
            self.step()
            self.version += 1
            t = time.perf_counter()
            hand_over(self, self.engine, "full", self.version, self.skip)
            out.append(time.perf_counter() - t)
        assert self.engine.pushed_in_place
        return out[1:]


def inproc(path: str, repeats: int) -> dict:
    """The colocated sync of the whole model and of its LoRA merge, ms: median and best of `repeats`."""
    import ray
    actor = ray.remote(num_cpus=0)(Colocated).remote(path, vllm_ready(path))
    try:
        full = ray.get(actor.pushes.remote(repeats))
        ray.get(actor.add_adapter.remote())
        lora = ray.get(actor.pushes.remote(repeats))
    finally:
        ray.kill(actor)
    return {"inproc_full_ms": statistics.median(full) * 1e3, "inproc_full_best_ms": min(full) * 1e3,
            "inproc_lora_ms": statistics.median(lora) * 1e3, "inproc_lora_best_ms": min(lora) * 1e3}


def bench_model(spec: str, repeats: int, bw: float) -> dict:
    import ray

    from rlhf_ray.config.schema import RolloutConfig
    from rlhf_ray.roles.generator.group import GeneratorGroup, tied_names
    from rlhf_ray.models.kit import resolve_model_path
    from rlhf_ray.sync.streamed import engine_transport
    from rlhf_ray.utils.device import resolve_backend

    path = resolve_model_path(spec)
    cfg = RolloutConfig(num_engines=1, cpus_per_engine=2, max_new_tokens=8)
    group = GeneratorGroup(vllm_ready(path), cfg, resolve_backend("cpu"), lora=True, max_model_len=256, max_lora_rank=8)
    learner = ray.remote(num_cpus=0)(HeldWeights).remote(path)
    version = itertools.count(1)   # the engine's version grows across the transports below

    def runs(restore: str, mode: str, adapter_config=None) -> list[dict]:
        sync = engine_transport("auto", group, bucket_mb=cfg.sync.bucket_mb, dtype=torch.float32, restore=restore)
        try:
            out = []
            for _ in range(repeats):
                ray.get(learner.step.remote())
                s = sync.send(learner, mode, next(version), adapter_config=adapter_config)
                out.append({"total_s": s.total_s, "pack_s": s.streamed.pack_s, "load_s": s.streamed.load_s,
                            "engine_s": s.engine_s, "buckets": s.streamed.buckets})
            return out
        finally:
            sync.close()
    try:
        params, full_bytes = ray.get(learner.sizes.remote(tied_names(path)))
        full = runs("learner", "full")
        full_disk = runs("disk", "full")
        adapter_cfg = ray.get(learner.add_adapter.remote())
        adapter_bytes = ray.get(learner.sizes.remote(frozenset(), "adapter"))[1]
        lora_bytes = ray.get(learner.sizes.remote(tied_names(path)))[1]
        adapter = runs("learner", "adapter", adapter_cfg)
        lora = runs("learner", "full")
    finally:
        group.shutdown()
        ray.kill(learner)

    def med(runs, key):   # the machine is shared and noisy: the median, and the best run below
        return statistics.median(r[key] for r in runs) * 1e3

    out = {"model": spec, "params": params,
           "full_bytes": full_bytes, "adapter_bytes": adapter_bytes, "buckets_full": full[0]["buckets"],
           "full_ms": med(full, "total_s"), "full_pack_put_ms": med(full, "pack_s"), "full_load_ms": med(full, "load_s"),
           "full_engine_reload_ms": med(full, "engine_s"),
           "full_disk_restore_ms": med(full_disk, "total_s"), "full_disk_restore_pack_put_ms": med(full_disk, "pack_s"),
           "adapter_ms": med(adapter, "total_s"), "adapter_pack_put_ms": med(adapter, "pack_s"),
           "adapter_load_ms": med(adapter, "load_s"),
           "adapter_engine_ms": med(adapter, "engine_s"), "memcpy_bound_full_ms": full_bytes / (bw * 1e9) * 1e3}
    out["full_vs_bound"] = out["full_ms"] / out["memcpy_bound_full_ms"]
    out["full_disk_restore_vs_bound"] = out["full_disk_restore_ms"] / out["memcpy_bound_full_ms"]
    # what the transport adds on top of vLLM's own reload (CPU: re-packing every linear for oneDNN)
    out["transport_ms"] = out["full_ms"] - out["full_engine_reload_ms"]
    out["transport_vs_bound"] = out["transport_ms"] / out["memcpy_bound_full_ms"]
    out["full_over_adapter"] = out["full_ms"] / out["adapter_ms"]
    out["full_best_ms"] = min(r["total_s"] for r in full) * 1e3
    out["full_best_vs_bound"] = out["full_best_ms"] / out["memcpy_bound_full_ms"]
    out["adapter_best_ms"] = min(r["total_s"] for r in adapter) * 1e3
    out |= {"lora_bytes": lora_bytes, "lora_ms": med(lora, "total_s"), "lora_engine_ms": med(lora, "engine_s"),
            "memcpy_bound_lora_ms": lora_bytes / (bw * 1e9) * 1e3}
    out |= inproc(path, repeats)
    bound = out["memcpy_bound_full_ms"]
    sent = {"full": bound, "lora": out["memcpy_bound_lora_ms"]}
    for key in ("lora", "inproc_full", "inproc_lora"):
        out[f"{key}_vs_bound"] = out[f"{key}_ms"] / bound
        out[f"{key}_vs_sent_bound"] = out[f"{key}_ms"] / sent[key.rpartition("_")[2]]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--out", default="sync_bench.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    torch.set_num_threads(2)
    load = os.getloadavg()[0]
    bw = memcpy_gbps()
    cpu = machine_record(2)
    print(describe(cpu), flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        rows = [bench_model("builtin:" + m, args.repeats, bw) for m in args.models]
    finally:
        ray.shutdown()
    result = {"load_avg_1m_at_start": load, "memcpy_GBps": bw, "bucket_mb": args.bucket_mb, "repeats": args.repeats, "models": rows,
              "cpu": cpu}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
