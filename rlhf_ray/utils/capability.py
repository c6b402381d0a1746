"""What this machine's CPU can do, measured: its model and flags, fp32 and bf16 GEMM throughput, and the
CPU compute dtype decided from them.

The same CPU family name hides very different bf16 hardware (STACK.md, torch, 2 threads, 2048^3):
AVX2 Zen 3 ran bf16 matmuls 7-500x SLOWER than fp32, an AMD EPYC with AVX-512 BF16 about 2-2.6x faster,
an Intel Xeon with AMX 6.2x faster. Flag names say a kernel could exist, not that torch's build uses it:
the decision reads a measurement. Benchmarks record `machine_record()` beside every result.
"""
from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")
ENV = "RLHF_RAY_CPU_DTYPE"  # float32 | bfloat16 | measure (default): tests pin float32
CHOICES = ("float32", "bfloat16", "measure")

# bf16 is chosen when its GEMM measures at least this many times fp32's. Why 2: a step is not all GEMM.
# TRL's SmolLM2 LoRA step went 16.8 s -> 12.5 s on AMX (GEMM 6.2x), i.e. GEMMs are g ~ 0.3 of the fp32
# step; the rest (softmax, norms, sampling, optimizer, Python) does not speed up and pays bf16<->fp32
# casts (say +10%). Step speed-up ~ 1 / (g / r + (1 - g) * 1.1): r = 2 gives ~1.09x, r = 1.5 ~1.03x
# (inside the 30% run-to-run noise of these VMs, STACK.md), while bf16 costs precision and loosens the
# log-prob agreement check (LOGPROB_TOLERANCE). So below 2x bf16 does not pay; AMX (6.2x, ~1.2x step
# today, more as the framework overhead shrinks) and AVX-512 BF16 (2-2.6x) pass, AVX2 (<0.15x) does not.
BF16_MIN_SPEEDUP = 2.0


def cpu_info(cpuinfo: str | None = None) -> dict:
    """{"model", "family", "model_id", "flags": {flag: bool for FLAGS}, "cores"} from /proc/cpuinfo (or the
    given text). The family and model numbers tell CPU kinds apart where the name does not: virtual machines
    here named Zen 2 (AVX2, bf16 far slower than fp32), Zen 4 and Zen 5 (AVX-512 BF16) all "AMD EPYC"."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    have = set(fields.get("flags", "").split())
    return {"model": fields.get("model name") or platform.processor() or platform.machine(),
            "family": fields.get("cpu family", ""), "model_id": fields.get("model", ""),
            "flags": {f: f in have for f in FLAGS}, "cores": os.cpu_count() or 1}


def flags_on(info: dict) -> str:
    return ",".join(f for f, on in info["flags"].items() if on)


def cpu_kind(info: dict) -> str:
    """The name, family, model number and flags: what a measurement is kept under (one name, several kinds)."""
    return f"{info['model']} | family {info['family']} model {info['model_id']} | {flags_on(info) or '-'}"


@contextmanager
def _threads(n: int | None):
    import torch
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _best_s(dtype: str, size: int, runs: int) -> float:
    """Best-of-`runs` seconds of a square `F.linear` (what the models' layers call) in `dtype`."""
    import torch
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size, size, generator=gen).to(getattr(torch, dtype))
    w = torch.randn(size, size, generator=gen).to(getattr(torch, dtype))
    F.linear(x, w)  # warm-up: kernel selection, weight packing
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return best


def _attention_ms(impl: str, runs: int = 3) -> float:
    """Best-of-`runs` ms of one bf16 causal attention forward + backward at a shape of SmolLM2's (8 sequences
    of 96 tokens, 9 heads of 64), computed as HF computes it with `impl`: "eager" (two matmuls and a softmax)
    or "sdpa" (torch's fused kernel)."""
    import torch
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 9, 96, 64, generator=gen).to(torch.bfloat16).requires_grad_() for _ in range(3))
    mask = torch.full((96, 96), float("-inf")).triu(1).to(torch.bfloat16)

    def step():
        if impl == "eager":
            scores = torch.softmax((q @ k.transpose(-1, -2) * 0.125 + mask).float(), -1).to(q.dtype)
            out = scores @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.sum().backward()
    step()  # warm-up
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def bf16_attention(record: dict) -> str:
    """HF's attention kernel for a model computing in bf16 on this CPU, from `measure`'s record: the plain one
    ("eager") where its forward + backward measured faster than SDPA's fused CPU kernel, else "sdpa". On the
    AVX-512 BF16 EPYCs eager's two GEMMs run on the bf16 units and SDPA's fused bf16 backward does not (Zen 4,
    2 threads: 14 vs 47 ms; a SmolLM2 LoRA update on Zen 5, 1 thread: 5.7 -> 4.0 s); another CPU's kernels may
    rank them the other way, hence measured. A record without the probe keeps eager."""
    eager, sdpa = record.get("bf16_attention_eager_ms"), record.get("bf16_attention_sdpa_ms")
    return "eager" if eager is None or sdpa is None or eager <= sdpa else "sdpa"


def measure(threads: int | None = None, n: int = 2048, runs: int = 3, budget_s: float = 2.0) -> dict:
    """fp32 and bf16 GEMM GFLOP/s on this CPU and their ratio, best of `runs`, on `threads` torch threads
    (default: the process's), both dtypes at the same size, and a bf16 attention's ms both ways HF computes it
    (`bf16_attention`). The size starts at 256 and doubles up to `n`
    (2048 is compute-bound on every CPU above) only while the next size's runs fit `budget_s`: a dtype
    without a fast kernel (bf16 on AVX2) would take a minute at 2048, and at the size where the probe stops
    it is already far behind fp32."""
    dtypes = ("float32", "bfloat16")
    t_start = time.perf_counter()
    with _threads(threads) as used:
        size, best = 256, {d: _best_s(d, 256, runs) for d in dtypes}
        while (size < n and time.perf_counter() - t_start < budget_s
               and sum(best.values()) * 8 * (runs + 1) <= budget_s):
            size *= 2
            best = {d: _best_s(d, size, runs) for d in dtypes}
        attention = {f"bf16_attention_{impl}_ms": _attention_ms(impl) for impl in ("eager", "sdpa")}
    gflops = {d: 2 * size ** 3 / max(best[d], 1e-12) / 1e9 for d in dtypes}
    return {"fp32_gflops": gflops["float32"], "bf16_gflops": gflops["bfloat16"],
            "bf16_speedup": gflops["bfloat16"] / max(gflops["float32"], 1e-12),
            "gemm_n": size, "threads": used, "op": "F.linear", **attention, "seconds": time.perf_counter() - t_start}


def machine_record(threads: int | None = None) -> dict:
    """What every benchmark JSON carries: the CPU, its flags, cores, torch, and GEMM peaks measured now."""
    import torch
    return {**cpu_info(), "torch": torch.__version__, **measure(threads)}


def decide_dtype(bf16_speedup: float, min_speedup: float = BF16_MIN_SPEEDUP) -> str:
    """The CPU compute dtype: bfloat16 when its GEMM measured at least `min_speedup` x fp32's."""
    return "bfloat16" if bf16_speedup >= min_speedup else "float32"


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rlhf_ray" / "cpu_capability.json"


_MEASURED: dict[str, dict] = {}
PROBE = "probe 2"  # what `measure` records: a record of an older probe (GEMMs only) is measured again


def cached_measure(threads: int | None = None, path: Path | None = None) -> dict:
    """`measure()` once per CPU kind (`cpu_kind`), torch version and thread count: kept in this process and in
    a small JSON under the user's cache folder, so a machine pays the probe's seconds once. A home folder that
    moves to a host of another kind under the same CPU name is measured again, not handed the other's dtype."""
    import torch
    with _threads(threads) as used:
        key = f"{cpu_kind(cpu_info())} | torch {torch.__version__} | {used} threads | {PROBE}"
    if key in _MEASURED:
        return _MEASURED[key]
    path = path or cache_path()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = measure(threads)
        try:  # atomic: parallel test workers may write at once
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: measure again next process
    _MEASURED[key] = known[key]
    return known[key]


def _wanted(env: dict | None) -> str:
    """What RLHF_RAY_CPU_DTYPE asks for (default: measure)."""
    return (os.environ if env is None else env).get(ENV, "measure")


def cpu_default_dtype(env: dict | None = None) -> str:
    """The dtype CPU roles compute in when the config asks to measure (`model.dtype=measure`).
    RLHF_RAY_CPU_DTYPE overrides: float32 or bfloat16 skip the probe (the test session pins float32,
    whose log-prob tolerances the suite asserts); measure (the default) decides from `cached_measure`."""
    want = _wanted(env)
    if want not in CHOICES:
        raise ValueError(f"{ENV}={want!r}: choose one of {', '.join(CHOICES)}")
    if want != "measure":
        return want
    return decide_dtype(cached_measure()["bf16_speedup"])


def describe(record: dict) -> str:
    """One line naming the machine a result came from (benchmarks print it above their tables)."""
    flags = flags_on(record) or "none of " + "/".join(FLAGS)
    kind = f" family {record['family']} model {record['model_id']}" if record.get("family") else ""
    return (f"{record['model']}{kind} ({flags}), {record['cores']} cores, torch {record['torch']}; "
            f"GEMM {record['gemm_n']}^3 "
            f"on {record['threads']} threads: fp32 {record['fp32_gflops']:.0f} GFLOP/s, bf16 "
            f"{record['bf16_gflops']:.0f} GFLOP/s ({record['bf16_speedup']:.2f}x)")


def slow_bf16_line(dtype: str, on_cpu: bool, env: dict | None = None) -> str | None:
    """The one line `rlhf-ray train` prints when model.dtype=bfloat16 was asked for on a CPU whose bf16 GEMM
    measured slower than its fp32 one (AVX2 without bf16 units: 0.12x on a Zen 3 through F.linear, torch.mm
    far worse): the run is allowed (bf16 numerics may be the point) but would otherwise be several times
    slower without a word. None where bf16 pays, off a CPU, or where RLHF_RAY_CPU_DTYPE pins the choice."""
    if dtype != "bfloat16" or not on_cpu or _wanted(env) != "measure":
        return None
    speedup = cached_measure()["bf16_speedup"]
    if speedup >= 1.0:
        return None
    return (f"model.dtype=bfloat16 on a CPU whose bf16 GEMM measured {speedup:.2f}x fp32's: this run computes "
            f"slower than in float32 (model.dtype auto picks float32 here)")


def measured_dtype_line(dtype: str | None, env: dict | None = None) -> str | None:
    """The one line `rlhf-ray train` prints when model.dtype auto (or measure) chose bf16 on this CPU, naming
    why and how to pin fp32; None otherwise (fp32 is what a CPU run has always used)."""
    if dtype != "bfloat16":
        return None
    if _wanted(env) != "measure":
        why = f"{ENV}=bfloat16"
    else:
        why = f"this CPU's bf16 GEMM measured {cached_measure()['bf16_speedup']:.1f}x fp32's"
    return f"model.dtype auto -> bfloat16 ({why}); model.dtype=float32 pins fp32"
