"""`rlhf-ray plan CONFIG [overrides]`: the placement (node -> GPU -> roles) and a memory table per GPU
with its headroom; exit status 1 when something does not fit, naming GPU, phase, role and line item."""
from __future__ import annotations

import json
from pathlib import Path

from rlhf_ray.placement.memory import PHASES, GiB, peak
from rlhf_ray.placement.plan import Plan


def model_config(spec: str) -> dict:
    """config.json of a model spec (built-in, hub id or folder). A hub id is read from the local hub cache,
    else from the facts this package ships (`placement/known_models`), else downloaded (config.json only)."""
    from rlhf_ray.models.hub import cached_snapshot, is_hub_id, resolve_hub_id
    from rlhf_ray.models.kit import resolve_model_path
    from rlhf_ray.placement.shapes import known_config
    if is_hub_id(spec):
        folder = cached_snapshot(spec, ["config.json"])
        if folder is None and (known := known_config(spec)) is not None:
            return known
        folder = folder or resolve_hub_id(spec, ["config.json"])
    else:
        folder = resolve_model_path(spec)
    return json.loads((Path(folder) / "config.json").read_text())


def _who(b) -> str:
    share = f" ({b.gpu_ask:g} GPU)" if 0 < b.gpu_ask < 1 else ""
    return "+".join(b.roles) + f" #{b.index}{share}" if len(b.roles) == 1 else f"worker #{b.index} [{'+'.join(b.roles)}]{share}"


def _runs(rows) -> list[str]:
    """One line per run of GPUs that hold one multi-GPU process or consecutive ranks of one role."""
    runs: list[list] = []  # [first GPU, last GPU, bundles in order]; a run only ever holds single-bundle GPUs
    for g, bundles in rows:
        if runs and len(bundles) == 1 and runs[-1][1] == g - 1 and runs[-1][2] is not None:
            prev, b = runs[-1][2][-1], bundles[0]
            if b is prev or (b.roles == prev.roles and b.gpu_ask >= 1 and b.index == prev.index + 1):
                runs[-1][1] = g
                if b is not prev:
                    runs[-1][2].append(b)
                continue
        runs.append([g, g, list(bundles) if len(bundles) == 1 else None, bundles])
    lines = []
    for run in runs:
        first, last, chain = run[0], run[1], run[2]
        gpu = f"GPU {first}" if first == last else f"GPUs {first}-{last}"
        who = ", ".join(_who(b) for b in run[-1]) if chain is None else \
            _who(chain[0]) + (f" ... {_who(chain[-1])}" if len(chain) > 1 else "")
        lines.append(f"  {gpu}: {who}")
    return lines


def format_plan(plan: Plan, name: str = "") -> str:
    c = plan.cluster
    lines = [f"plan {name}: placement={plan.placement} device={plan.device} "
             f"engine_sleeps={'yes' if plan.engine_sleeps else 'no'}; cluster: {len(c.nodes)} node(s), {c.gpus} GPU(s)"
             + (f" of {c.nodes[0].gpu_memory_gib:g} GiB" if c.nodes and c.nodes[0].gpu_memory_gib else "")]
    for n in sorted({b.node for b in plan.bundles}):
        lines.append(f"node {n}")
        gpus = sorted({g for b in plan.bundles if b.node == n for g in b.gpus})
        rows = [(g, [b for b in plan.bundles if b.node == n and g in b.gpus]) for g in gpus]
        lines += _runs(rows)
        cpu_only = [b for b in plan.bundles if b.node == n and not b.gpus]
        if cpu_only:
            lines.append("  CPU only: " + ", ".join(f"{_who(b)} ({b.cpus:g} CPU)" for b in cpu_only))
    if plan.simulated:
        lines.insert(0, "*** SIMULATION: Ray's GPUs are logical (no CUDA); every role computes on CPU with gloo ***")
    if plan.micro_batches:
        lines.append("scoring micro-batches: " + ", ".join(f"{r} {m}" for r, m in plan.micro_batches.items()))
    lines += _memory_tables(plan)
    from rlhf_ray.placement.budget import host_ram
    for node, used in sorted(host_ram(plan.memory).items()):
        have = plan.cluster.nodes[node].cpu_memory_gib
        lines.append(f"host RAM on node {node}: {used / GiB:.1f} GiB parked by the GPU processes"
                     + (f" of {have:g} GiB" if have else " (cluster.cpu_memory_gib not declared: not checked)"))
    return "\n".join(lines)


def _memory_tables(plan: Plan) -> list[str]:
    if not plan.memory:
        return []
    groups: dict[tuple, list] = {}
    for key, items in sorted(plan.memory.items()):  # identical GPUs share one table
        sig = tuple((i.role, i.name, round(i.bytes / 2 ** 20), i.phases, i.host) for i in items)
        groups.setdefault(sig, []).append(key)
    out = [f"memory per GPU in GiB (a phase's column counts what is live then; host RAM is not on the GPU)"]
    for keys in groups.values():
        items = plan.memory[keys[0]]
        cap = plan.cluster.nodes[keys[0][0]].gpu_memory_gib * GiB
        where = ", ".join(f"node {n} GPU {g}" for n, g in keys) if len(keys) <= 4 else \
            f"{len(keys)} GPUs: node {keys[0][0]} GPU {keys[0][1]} ... node {keys[-1][0]} GPU {keys[-1][1]}"
        out.append(f"\n  [{where}]")
        out.append(f"  {'process':<24}{'item':<46}" + "".join(f"{p:>10}" for p in PHASES))
        for i in items:
            cells = "".join(f"{(i.bytes / GiB if p in i.phases else 0):>10.2f}" for p in PHASES)
            out.append(f"  {i.role:<24}{i.name + (' [host RAM]' if i.host else ''):<46}{cells}")
        totals = [sum(i.bytes for i in items if p in i.phases and not i.host) / GiB for p in PHASES]
        out.append(f"  {'total on the GPU':<70}" + "".join(f"{t:>10.2f}" for t in totals))
        phase, top = peak(items)
        kv = next((i for i in items if i.name == "KV cache"), None)
        if kv is not None and plan.kv_bytes_per_token:
            tokens = kv.bytes / plan.kv_bytes_per_token
            out.append(f"  KV cache holds {tokens:,.0f} tokens ({tokens / plan.seq_len:.1f} sequences of {plan.seq_len})")
        if cap:
            out.append(f"  capacity {cap / GiB:g} GiB; peak {top / GiB:.2f} GiB while it {phase}s; "
                       f"headroom {(cap - top) / GiB:.2f} GiB ({(cap - top) / cap:.0%})")
        else:
            out.append("  capacity not declared (cluster.gpu_memory_gib=0): not checked")
    return out


def plan_json(cfg, plan: Plan, problems: list[str]) -> dict:
    """The plan for `rlhf-ray plan --json`: per process its bundle, the memory of its GPUs and a `construct`
    object (`rlhf_ray.placement.construct`: what its libraries are built with)."""
    from rlhf_ray.placement.construct import construct
    args = construct(cfg, plan)
    processes = []
    for b, p in zip(plan.bundles, args.processes):
        memory = {f"node {b.node} GPU {g}": [{"role": i.role, "item": i.name, "gib": round(i.bytes / GiB, 3),
                                              "phases": sorted(i.phases), "host": i.host}
                                             for i in plan.memory.get((b.node, g), []) if i.role in b.roles
                                             or i.role == "+".join(b.roles)]
                  for g in b.gpus}
        construct_obj = {k: v for k, v in args.to_json()["processes"][len(processes)].items()
                         if k in ("threads", "engine", "learners", "scorers")}
        processes.append({"roles": list(b.roles), "index": b.index, "node": b.node, "gpus": list(b.gpus),
                          "cpus": b.cpus, "gpu_ask": b.gpu_ask, "memory": memory, "construct": construct_obj})
    return {"name": cfg.run.name, "placement": plan.placement, "device": plan.device, "simulated": plan.simulated,
            "engine_sleeps": plan.engine_sleeps, "cores": args.cores, "micro_batches": plan.micro_batches,
            "sync": args.to_json()["sync"], "shares": args.to_json()["shares"], "processes": processes,
            "problems": problems}


def print_plan(cfg, as_json: bool = False) -> int:
    """`rlhf-ray plan`: the placement and the memory table (or, `as_json`, every process with its construction
    arguments); 1 when something does not fit."""
    from rlhf_ray.placement.budget import budget
    from rlhf_ray.placement.plan import place
    plan, problems = budget(cfg, place(cfg), model_config)
    if as_json:
        print(json.dumps(plan_json(cfg, plan, problems), indent=2))
        return 1 if problems else 0
    print(format_plan(plan, cfg.run.name))
    for p in problems:
        print(f"DOES NOT FIT: {p}")
    return 1 if problems else 0
