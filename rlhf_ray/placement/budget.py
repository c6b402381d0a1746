"""The plan's memory half: per-GPU line items of every process on it, the scoring micro-batches, and
what does not fit (naming the GPU, the phase, the role and the line item).

Model shapes come from each model's config.json through `read_config(spec) -> dict` (the hub cache for a
hub id, the folder otherwise), so no weights are needed.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable

from rlhf_ray.placement.memory import (
    DTYPE_BYTES, GiB, PROCESS_OVERHEAD, Item, LearnerSpec, engine_items, frozen_items, learner_items, peak,
)
from rlhf_ray.placement.construct import enforce_eager
from rlhf_ray.placement.plan import Bundle, Plan, role_dtype, engine_quantization
from rlhf_ray.placement.shapes import ModelShape

if TYPE_CHECKING:
    from rlhf_ray.config import Config

SCORING_MICRO_BATCHES = (64, 32, 16, 8, 4, 2, 1)


def model_specs(cfg: "Config", roles: tuple[str, ...]) -> dict[str, list[str]]:
    """The model each role loads (`stage:rm`, the reward model trained in this run, starts from
    rm.init_from or model.path: the same shape)."""
    out = {r: [cfg.model.path] for r in ("policy", "critic", "generator") if r in roles}
    if "reference" in roles:
        out["reference"] = [cfg.reference.path or cfg.model.path]
    out["reward"] = [cfg.rm.init_from or cfg.model.path if s.path == "stage:rm" else s.path
                     for s in cfg.reward.sources if s.kind == "model"]
    return out


def budget(cfg: "Config", plan: Plan, read_config: Callable[[str], dict]) -> tuple[Plan, list[str]]:
    """The plan with `memory` and `micro_batches` filled in, and the problems (empty when it all fits)."""
    specs = model_specs(cfg, plan.roles)
    shapes = {s: ModelShape.from_config(read_config(s), name=s) for ss in specs.values() for s in ss}
    seq = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    capacity = {(b.node, g): plan.cluster.nodes[b.node].gpu_memory_gib * GiB for b in plan.bundles for g in b.gpus}

    def assemble(micro: dict[str, int]) -> dict[tuple[int, int], list[Item]]:
        per_gpu: dict[tuple[int, int], list[Item]] = {}
        for b in plan.bundles:
            for g in b.gpus:
                per_gpu.setdefault((b.node, g), []).extend(
                    _process_items(cfg, plan, b, shapes, specs, seq, capacity[(b.node, g)], micro))
        return per_gpu

    micro: dict[str, int] = {}
    for role in ("reference", "reward"):  # the largest micro-batch whose logits fit every GPU of the role
        keys = [(b.node, g) for b in plan.bundles_of(role) for g in b.gpus]
        if not keys or not specs.get(role):
            continue
        for mb in SCORING_MICRO_BATCHES:
            micro[role] = mb
            per_gpu = assemble(micro)
            if all(not capacity[k] or peak(per_gpu[k])[1] <= capacity[k] for k in keys):
                break
    per_gpu = assemble(micro)
    problems: list[str] = []
    for role in ("reference", "reward"):  # a model on CPU beside GPU roles: fp32, host RAM, hours per step
        if plan.device == "cuda" and specs.get(role) and plan.role_device(role) == "cpu":
            problems.append(f"{role} loads {specs[role][0]} on CPU ({role}.num_gpus=0) in a cluster.device=cuda "
                            f"run; give it {role}.num_gpus (a fraction shares a GPU)")
    for key, items in sorted(per_gpu.items()):
        problems += _check(key, items, capacity[key], cfg, plan, shapes, specs, seq)
    for node, used in host_ram(per_gpu).items():
        have = plan.cluster.nodes[node].cpu_memory_gib * GiB
        if have and used > have:
            problems.append(f"node {node} needs {used / GiB:.0f} GiB of host RAM (offloaded optimizer states, sleeping "
                            f"engines) but has {have / GiB:g} GiB (cluster.cpu_memory_gib)")
    kv = 0.0
    if "generator" in specs:
        kv = shapes[specs["generator"][0]].kv_bytes_per_token(
            DTYPE_BYTES[role_dtype(cfg, plan, "generator")], cfg.rollout.tensor_parallel_size)
    return replace(plan, memory=per_gpu, micro_batches=micro, kv_bytes_per_token=kv, seq_len=seq), problems


def host_ram(per_gpu: dict) -> dict[int, float]:
    """Bytes of host RAM per node that the GPU processes park there (the largest phase)."""
    out: dict[int, dict[str, float]] = {}
    for (node, _), items in per_gpu.items():
        for i in items:
            if i.host:
                for phase in i.phases:
                    out.setdefault(node, {}).setdefault(phase, 0.0)
                    out[node][phase] += i.bytes
    return {n: max(p.values()) for n, p in out.items()}


def _process_items(cfg, plan: Plan, b: Bundle, shapes, specs, seq, capacity, micro: dict) -> list[Item]:
    """Line items of process `b` on one of its GPUs (`micro`: the scoring micro-batch per role)."""
    items = [Item("+".join(b.roles), "CUDA context, NCCL, allocator", PROCESS_OVERHEAD)]
    m, r = cfg.model, cfg.rollout
    world = cfg.rl.policy.num_ranks
    lora = m.lora.enabled
    for role in b.roles:
        if role == "policy" or role == "critic":
            lc = cfg.rl.policy if role == "policy" else cfg.rl.critic
            shape = shapes[specs[role][0]]
            items += learner_items(role, shape, LearnerSpec(
                head="lm" if role == "policy" else "value", dtype=role_dtype(cfg, plan, role),
                world=world if plan.placement == "colocated" else lc.num_ranks,
                zero_stage=lc.deepspeed.zero_stage, offload_optimizer=lc.deepspeed.offload_optimizer,
                offload_params=lc.deepspeed.offload_params, checkpointing=m.gradient_checkpointing,
                tokens=lc.micro_batch_size * seq, logit_tokens=lc.micro_batch_size * (r.max_new_tokens + 1),
                lora_params=shape.lora_params(m.lora.r, m.lora.target_modules) if lora else 0,
                nf4_double_quant=m.quantization.double_quant if m.quantization.load_in_4bit else None,
                ref_forward=role == "policy" and lora and cfg.reference.path is None and cfg.reference.kl_coef > 0))
        elif role == "generator":
            shape = shapes[specs[role][0]]
            items += engine_items(shape, dtype=role_dtype(cfg, plan, role), quantization=engine_quantization(cfg, plan),
                                  tp=r.tensor_parallel_size, utilization=r.gpu_memory_utilization, capacity=capacity,
                                  enforce_eager=enforce_eager(cfg, plan), sleeps=plan.engine_sleeps,
                                  lora_params=shape.lora_params(m.lora.r, m.lora.target_modules) if lora else 0)
        elif role in ("reference", "reward"):
            mb = micro.get(role, 1)
            for spec in specs.get(role, []):
                items += frozen_items(role, shapes[spec], head="lm" if role == "reference" else "score",
                                      dtype=role_dtype(cfg, plan, role), tokens=mb * seq,
                                      logit_tokens=mb * (r.max_new_tokens + 1))
    return items


def _check(key, items, capacity, cfg, plan, shapes, specs, seq) -> list[str]:
    node, gpu = key
    out = []
    for i in items:
        if i.name == "KV cache":
            shape = shapes[specs["generator"][0]]
            tp = cfg.rollout.tensor_parallel_size
            need = shape.kv_bytes_per_token(DTYPE_BYTES[role_dtype(cfg, plan, "generator")], tp) * seq
            if i.bytes < need:
                taken = ", ".join(f"{j.name} {j.bytes / GiB:.1f} GiB" for j in items
                                  if j.role == "generator" and j.name.startswith("engine") and not j.host)
                out.append(f"node {node} GPU {gpu}: generator KV cache gets {i.bytes / GiB:.2f} GiB of "
                           f"rollout.gpu_memory_utilization={cfg.rollout.gpu_memory_utilization:g} x "
                           f"{capacity / GiB:g} GiB after {taken}, but one sequence of {seq} tokens needs "
                           f"{need / GiB:.2f} GiB")
    if not capacity:
        return out
    phase, total = peak(items)
    if total > capacity:
        live = sorted((i for i in items if phase in i.phases and not i.host), key=lambda i: -i.bytes)
        top = ", ".join(f"{i.role} {i.name} {i.bytes / GiB:.1f} GiB" for i in live[:3])
        out.append(f"node {node} GPU {gpu} needs {total / GiB:.1f} GiB while it {phase}s but has "
                   f"{capacity / GiB:g} GiB (cluster.gpu_memory_gib); largest: {top}")
    return out
