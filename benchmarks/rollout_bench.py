"""Rollout throughput: the vLLM generator vs HF `generate`, SmolLM2-135M fp32, batch 64.

    python benchmarks/rollout_bench.py [--batch 64] [--new-tokens 32] [--repeats 3] [--out rollout_bench.json]

Both sample (temperature 1, top-p 1) `new_tokens` per prompt on 2 threads in this process, HF first
(vLLM forbids `torch.set_num_threads` once its engine is up). Tokens/s counts generated tokens up to
and including EOS, best of `repeats` after one warm-up. Run it alone: the machine has 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["OMP_NUM_THREADS"] = "2"
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rlhf_ray.utils.capability import describe, machine_record  # noqa: E402


def prompts_for(tokenizer, batch: int, prompt_tokens: int) -> list[list[int]]:
    from rlhf_ray.data.builtin_reviews import prompt_rows
    rows = prompt_rows(batch, seed=0)
    texts = [next(v for v in r.values() if isinstance(v, str)) for r in rows]
    return [tokenizer(t)["input_ids"][:prompt_tokens] for t in texts]


def hf_tokens_per_s(path, prompts, new_tokens, repeats) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), tok.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):            # left padding
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id or 0)
        gen = out[:, P:].tolist()
        return sum((g.index(eos) + 1) if eos in g else len(g) for g in gen)

    run()
    best = None
    for _ in range(repeats):
        t = time.perf_counter()
        n = run()
        dt = time.perf_counter() - t
        best = max(best or 0, n / dt)
    return {"tokens_per_s": best, "tokens_last": n}


def vllm_tokens_per_s(path, prompts, new_tokens, repeats) -> dict:
    from rlhf_ray.config.schema import RolloutConfig
    from rlhf_ray.roles.generator.engine import GeneratorEngine
    from rlhf_ray.utils.device import resolve_backend

    cfg = RolloutConfig(n_samples_per_prompt=1, temperature=1.0, max_new_tokens=new_tokens, cpus_per_engine=2,
                        kv_cache_gib=1.0, seed=0)
    engine = GeneratorEngine(path, cfg, resolve_backend("cpu"), max_model_len=256)
    try:
        engine.generate(prompts)
        best = None
        for k in range(repeats):
            t = time.perf_counter()
            r = engine.generate(prompts, seeds=[k * 1000 + i for i in range(len(prompts))])
            dt = time.perf_counter() - t
            n = sum(len(x) for x in r.response_ids)
            best = max(best or 0, n / dt)
    finally:
        engine.close()
    return {"tokens_per_s": best, "tokens_last": n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="rollout_bench.json")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from rlhf_ray.models.kit import resolve_model_path
    from sync_bench import vllm_ready

    path = vllm_ready(resolve_model_path("builtin:" + args.model))
    prompts = prompts_for(AutoTokenizer.from_pretrained(path), args.batch, args.prompt_tokens)
    load = os.getloadavg()[0]
    cpu = machine_record(2)  # before vLLM starts: its CPU worker turns torch.set_num_threads into a no-op
    print(describe(cpu), flush=True)
    hf = hf_tokens_per_s(path, prompts, args.new_tokens, args.repeats)
    vl = vllm_tokens_per_s(path, prompts, args.new_tokens, args.repeats)
    result = {"model": args.model, "batch": args.batch, "new_tokens": args.new_tokens, "threads": 2,
              "load_avg_1m_at_start": load, "hf_generate": hf, "vllm_generator": vl,
              "speedup": vl["tokens_per_s"] / hf["tokens_per_s"], "cpu": cpu}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
