"""The measured CPU capability (rlhf_ray.utils.capability) and the dtype `model.dtype=measure` resolves to.
Pure: the probe's timings are faked except in one tiny real GEMM run."""
import json
from pathlib import Path

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.placement.plan import place, role_dtype
from rlhf_ray.utils import capability as cap
from rlhf_ray.utils.device import resolve_backend

AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
model name\t: ignored, the first processor's
"""
ZEN3 = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu avx avx2 fma\n"


def test_cpu_info_reads_the_model_and_whole_flag_words():
    info = cap.cpu_info(AMX)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert info["flags"] == {"avx512_bf16": True, "amx_bf16": True, "amx_tile": True, "avx512f": True, "avx2": True}
    assert cap.cpu_info(ZEN3)["flags"] == {"avx512_bf16": False, "amx_bf16": False, "amx_tile": False,
                                           "avx512f": False, "avx2": True}
    # a word that only contains a flag's name is not the flag
    assert cap.cpu_info("flags\t: avx512_bf16x avx2_\n")["flags"]["avx512_bf16"] is False
    assert cap.cpu_info("flags\t: avx512_bf16x avx2_\n")["flags"]["avx2"] is False


@pytest.mark.parametrize("speedup, dtype", [
    (1 / 500, "float32"),   # AVX2 Zen 3 torch.mm bf16 (STACK.md)
    (1 / 7, "float32"),     # AVX2 F.linear bf16
    (1.5, "float32"),       # a bf16 gain the non-GEMM work and noise would eat
    (2.0, "bfloat16"),      # the stated threshold
    (2.6, "bfloat16"),      # AMD EPYC with AVX-512 BF16
    (6.2, "bfloat16"),      # Intel AMX
])
def test_decision_follows_the_measured_ratio(speedup, dtype):
    assert cap.decide_dtype(speedup) == dtype


def test_env_pins_skip_the_probe_and_bad_values_are_refused(monkeypatch):
    monkeypatch.setattr(cap, "cached_measure", lambda *a, **k: pytest.fail("pinned: no probe"))
    assert cap.cpu_default_dtype({cap.ENV: "float32"}) == "float32"
    assert cap.cpu_default_dtype({cap.ENV: "bfloat16"}) == "bfloat16"
    with pytest.raises(ValueError, match="RLHF_RAY_CPU_DTYPE='fp16': choose one of float32, bfloat16, measure"):
        cap.cpu_default_dtype({cap.ENV: "fp16"})


@pytest.mark.parametrize("speedup, dtype", [(6.2, "bfloat16"), (0.002, "float32")])
def test_measure_decides_from_the_probe(monkeypatch, speedup, dtype):
    monkeypatch.setattr(cap, "cached_measure", lambda *a, **k: {"bf16_speedup": speedup})
    assert cap.cpu_default_dtype({}) == dtype            # unset means measure
    assert cap.cpu_default_dtype({cap.ENV: "measure"}) == dtype


def test_the_probe_runs_once_per_machine_and_is_kept_on_disk(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cap, "measure", lambda threads=None: calls.append(1) or {"bf16_speedup": 3.0})
    monkeypatch.setattr(cap, "_MEASURED", {})
    path = tmp_path / "cpu_capability.json"
    assert cap.cached_measure(path=path)["bf16_speedup"] == 3.0
    assert cap.cached_measure(path=path)["bf16_speedup"] == 3.0  # this process: memory
    monkeypatch.setattr(cap, "_MEASURED", {})                      # a new process: the file
    assert cap.cached_measure(path=path)["bf16_speedup"] == 3.0
    assert len(calls) == 1
    (key,) = json.loads(path.read_text())
    assert cap.cpu_info()["model"] in key and torch.__version__ in key and f"{torch.get_num_threads()} threads" in key
    assert key.endswith(cap.PROBE)   # a record of an older probe (without the attention's) is measured again
    path.write_text("{not json")                                   # a damaged file: measured again
    monkeypatch.setattr(cap, "_MEASURED", {})
    assert cap.cached_measure(path=path)["bf16_speedup"] == 3.0 and len(calls) == 2


def test_one_cpu_name_on_two_kinds_is_measured_on_each(monkeypatch, tmp_path):
    """These VMs name Zen 2 (AVX2: bf16 GEMM far slower than fp32) and Zen 5 (AVX-512 BF16) both "AMD EPYC": a
    home folder that moves between them must not carry one's measurement, and so its dtype, to the other."""
    zen5 = "model name\t: AMD EPYC\ncpu family\t: 26\nmodel\t\t: 2\nflags\t\t: avx2 avx512f avx512_bf16\n"
    zen2 = "model name\t: AMD EPYC\ncpu family\t: 23\nmodel\t\t: 49\nflags\t\t: avx2\n"
    assert cap.cpu_info(zen2)["family"] == "23" and cap.cpu_info(zen2)["model_id"] == "49"
    here, real = [zen5], cap.cpu_info
    monkeypatch.setattr(cap, "cpu_info", lambda text=None: real(here[0]))
    monkeypatch.setattr(cap, "measure", lambda threads=None: {"bf16_speedup": {zen5: 4.5, zen2: 0.01}[here[0]]})
    monkeypatch.setattr(cap, "_MEASURED", {})
    path = tmp_path / "cpu_capability.json"
    assert cap.decide_dtype(cap.cached_measure(path=path)["bf16_speedup"]) == "bfloat16"
    here[0] = zen2                                                 # the same home on the other host kind
    monkeypatch.setattr(cap, "_MEASURED", {})
    assert cap.decide_dtype(cap.cached_measure(path=path)["bf16_speedup"]) == "float32"
    assert len(json.loads(path.read_text())) == 2


def test_probe_grows_the_size_only_while_it_fits_the_budget(monkeypatch):
    monkeypatch.setattr(cap, "_best_s", lambda dtype, size, runs: 1e-6 * (size / 256) ** 3)
    assert cap.measure(n=2048)["gemm_n"] == 2048
    slow = {"float32": 1e-6, "bfloat16": 0.2}  # bf16 without a fast kernel: stop at the first size
    monkeypatch.setattr(cap, "_best_s", lambda dtype, size, runs: slow[dtype] * (size / 256) ** 3)
    r = cap.measure(n=2048, budget_s=1.0)
    assert r["gemm_n"] == 256 and r["bf16_speedup"] == pytest.approx(1e-6 / 0.2)


def test_probe_measures_real_gemms_and_attention_both_ways():
    r = cap.measure(threads=1, n=256, runs=1)
    assert r["gemm_n"] == 256 and r["threads"] == 1 and r["fp32_gflops"] > 0 and r["bf16_gflops"] > 0
    assert r["bf16_speedup"] == pytest.approx(r["bf16_gflops"] / r["fp32_gflops"])
    assert r["bf16_attention_eager_ms"] > 0 and r["bf16_attention_sdpa_ms"] > 0


@pytest.mark.parametrize("record, kernel", [
    ({"bf16_attention_eager_ms": 14.0, "bf16_attention_sdpa_ms": 47.0}, "eager"),   # AMD EPYC Zen 4, 2 threads
    ({"bf16_attention_eager_ms": 20.0, "bf16_attention_sdpa_ms": 9.0}, "sdpa"),     # a CPU whose fused kernel wins
    ({"bf16_speedup": 2.4}, "eager"),                                               # a record of the GEMM-only probe
])
def test_bf16_attention_is_the_kernel_measured_faster(record, kernel):
    assert cap.bf16_attention(record) == kernel


def test_probe_restores_the_thread_count():
    before = torch.get_num_threads()
    cap.measure(threads=1 if before != 1 else 2, n=256, runs=1)
    assert torch.get_num_threads() == before


def test_measure_in_the_config_resolves_once_with_tis_on_for_bf16(monkeypatch):
    monkeypatch.setenv(cap.ENV, "bfloat16")
    cfg = load_config(None, ["model.dtype=measure"])
    assert cfg.model.dtype == "bfloat16" and cfg.algorithm.is_correction == "tis"
    plan = place(cfg)
    assert role_dtype(cfg, plan, "policy") == role_dtype(cfg, plan, "generator") == "bfloat16"
    assert load_config(None, ["model.dtype=measure", "algorithm.tis=false"]).algorithm.is_correction == "none"
    monkeypatch.setenv(cap.ENV, "float32")
    cfg = load_config(None, ["model.dtype=measure"])
    assert cfg.model.dtype == "float32" and cfg.algorithm.is_correction == "none"  # as auto: lockstep, no TIS


def test_auto_measures_on_cpu_and_gpu_roles_keep_their_default(monkeypatch):
    monkeypatch.setenv(cap.ENV, "bfloat16")        # what the probe decides on an AVX-512 BF16 or AMX CPU
    cfg = load_config(None, [])
    assert cfg.model.dtype == "bfloat16" and cfg.algorithm.is_correction == "tis"
    assert role_dtype(cfg, place(cfg), "policy") == role_dtype(cfg, place(cfg), "generator") == "bfloat16"
    assert load_config(None, ["model.dtype=float32"]).model.dtype == "float32"   # a pinned dtype stays
    monkeypatch.setenv(cap.ENV, "float32")         # ... and on an AVX2 CPU
    assert load_config(None, []).model.dtype == "float32"
    monkeypatch.setenv(cap.ENV, "bfloat16")
    gpu = "configs/gpu/llama3.1-8b-8xh100.yaml"
    assert load_config(gpu, ["model.dtype=auto"]).model.dtype == "auto"   # GPU roles: bf16 by the plan
    assert load_config(gpu, ["model.dtype=measure"]).model.dtype == "auto"
    assert load_config(gpu, ["model.dtype=auto", "cluster.simulate=true"]).model.dtype == "auto"  # as planned
    sim = load_config(gpu, ["model.dtype=measure", "cluster.simulate=true"])  # every role computes on CPU
    assert sim.model.dtype == "bfloat16"


def test_resolve_backend_measures_on_cpu(monkeypatch):
    monkeypatch.setenv(cap.ENV, "bfloat16")
    assert resolve_backend("cpu", "measure").dtype == torch.bfloat16
    assert resolve_backend("cpu", "auto").dtype == torch.bfloat16
    monkeypatch.setenv(cap.ENV, "float32")
    assert resolve_backend("cpu", "measure").dtype == torch.float32


def test_machine_record_names_the_cpu_its_flags_cores_and_measured_peaks(monkeypatch):
    monkeypatch.setattr(cap, "measure", lambda threads=None: {"fp32_gflops": 379.0, "bf16_gflops": 2364.0,
                                                              "bf16_speedup": 6.24, "gemm_n": 2048, "threads": 2})
    real = cap.cpu_info
    monkeypatch.setattr(cap, "cpu_info", lambda: real(AMX))
    r = cap.machine_record(2)
    assert r["model"].startswith("Intel(R) Xeon(R)") and r["flags"]["amx_bf16"] and r["cores"] >= 1
    assert r["torch"] == torch.__version__ and r["fp32_gflops"] == 379.0 and r["bf16_gflops"] == 2364.0
    assert cap.describe(r) == ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (avx512_bf16,amx_bf16,amx_tile,avx512f,"
                               f"avx2), {r['cores']} cores, torch {torch.__version__}; GEMM 2048^3 on 2 threads: "
                               "fp32 379 GFLOP/s, bf16 2364 GFLOP/s (6.24x)")
    zen3 = {**r, **real(ZEN3)}
    assert cap.describe(zen3).startswith("AMD EPYC 7B13 (avx2), ")  # only the flags it has


def test_train_names_a_measured_bf16_choice_in_one_line(monkeypatch):
    monkeypatch.setattr(cap, "cached_measure", lambda *a, **k: {"bf16_speedup": 4.55})
    monkeypatch.setenv(cap.ENV, "measure")
    cfg = load_config(None, [])                                  # auto, on CPU: measured -> bf16
    assert cfg._measured == "bfloat16"
    assert cap.measured_dtype_line(cfg._measured) == ("model.dtype auto -> bfloat16 (this CPU's bf16 GEMM measured "
                                                      "4.5x fp32's); model.dtype=float32 pins fp32")
    assert load_config(None, ["model.dtype=bfloat16"])._measured is None   # asked for: nothing to say
    monkeypatch.setattr(cap, "cached_measure", lambda *a, **k: {"bf16_speedup": 1.2})
    assert load_config(None, [])._measured == "float32" and cap.measured_dtype_line("float32") is None
    assert "RLHF_RAY_CPU_DTYPE=bfloat16" in cap.measured_dtype_line("bfloat16", {cap.ENV: "bfloat16"})


def test_train_names_an_asked_for_bf16_that_this_cpu_runs_slower_in_one_line(monkeypatch):
    """model.dtype=bfloat16 on an AVX2 CPU (bf16 GEMM measured 0.12x fp32's on a Zen 3): allowed, and said."""
    monkeypatch.setenv(cap.ENV, "measure")
    monkeypatch.setattr(cap, "cached_measure", lambda *a, **k: {"bf16_speedup": 0.12})
    cfg = load_config(None, ["model.dtype=bfloat16"])
    assert cfg.computes_on_cpu and cfg.model.dtype == "bfloat16"
    assert cap.slow_bf16_line(cfg.model.dtype, cfg.computes_on_cpu) == (
        "model.dtype=bfloat16 on a CPU whose bf16 GEMM measured 0.12x fp32's: this run computes slower than in "
        "float32 (model.dtype auto picks float32 here)")
    assert cap.slow_bf16_line("float32", True) is None
    assert cap.slow_bf16_line("bfloat16", False) is None                       # a GPU's bf16 is not probed
    assert cap.slow_bf16_line("bfloat16", True, {cap.ENV: "bfloat16"}) is None  # pinned by the operator
    assert not load_config(None, ["cluster.device=cuda", "cluster.gpus_per_node=1"]).computes_on_cpu
    monkeypatch.setattr(cap, "cached_measure", lambda *a, **k: {"bf16_speedup": 2.3})
    assert cap.slow_bf16_line("bfloat16", True) is None                        # bf16 pays here


def test_rlhf_ray_train_prints_the_slow_bf16_line_before_its_checks(monkeypatch, tmp_path, capsys):
    """The line comes before the run's input checks (here `--resume` with nothing to resume stops it)."""
    from rlhf_ray import cli
    monkeypatch.setenv(cap.ENV, "measure")
    monkeypatch.setattr(cap, "cached_measure", lambda *a, **k: {"bf16_speedup": 0.12})
    config = str(Path(__file__).parents[1] / "configs" / "quickstart.yaml")
    code = cli.main(["train", config, f"run.output_dir={tmp_path}", "model.dtype=bfloat16", "--resume"])
    out, err = capsys.readouterr()
    assert code != 0 and "nothing to resume" in err
    assert out.startswith("model.dtype=bfloat16 on a CPU whose bf16 GEMM measured 0.12x fp32's"), out
