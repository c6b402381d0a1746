"""Serving throughput and latency of `rlhf-ray serve` with the official `openai` client.

Starts the server through the CLI (as an operator would), then for each concurrency level sends
`rounds x concurrency` completion requests of exactly --new-tokens tokens (ignore_eos), `concurrency` in flight
at a time, and records tokens/s and per-request latency (p50/p99). Level 1 is one-at-a-time serving; the
ratio of each level's tokens/s to level 1's is measured in the same run, on the same server.

  python benchmarks/serve_bench.py --model builtin:tiny
  python benchmarks/serve_bench.py --model builtin:smollm2-135m --levels 1 8 32 64
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "review of the fox :"


def start_server(model: str, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", "serve", "configs/quickstart.yaml",
                             f"serve.model={model}", f"serve.port={port}", "serve.max_tokens=64", *extra,
                             "--seconds", "3600"], cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("server did not come up")


def run_level(client, model_name: str, concurrency: int, requests: int, new_tokens: int) -> dict:
    def one(_):
        t = time.perf_counter()
        r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=new_tokens, temperature=1.0,
                                      extra_body={"ignore_eos": True})
        return time.perf_counter() - t, r.usage.completion_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"concurrency": concurrency, "requests": requests, "completion_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "p50_s": round(statistics.median(lat), 4),
            "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 4)}


def main() -> None:
    import openai
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x concurrency (>= 16)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--port", type=int, default=8477)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("overrides", nargs="*", help="config overrides for the server, e.g. serve.cpus_per_replica=2")
    args = ap.parse_args()
    from rlhf_ray.models.kit import resolve_model_path
    model = resolve_model_path(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.model.replace("builtin:", "").replace("/", "_")
    log = Path(tempfile.gettempdir()) / f"serve_bench_{tag}.log"  # the server's console, for when it fails
    proc = start_server(model, args.port, log, args.overrides)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none", max_retries=0,
                               timeout=600)
        run_level(client, "rlhf-ray-policy", 4, 4, args.new_tokens)  # warm-up
        levels = []
        for c in args.levels:
            levels.append(run_level(client, "rlhf-ray-policy", c, max(16, args.rounds * c), args.new_tokens))
            print(json.dumps(levels[-1]), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    serial = levels[0]["tokens_per_s"] if levels[0]["concurrency"] == 1 else None
    result = {"model": args.model, "new_tokens": args.new_tokens, "server": "rlhf-ray serve (Ray Serve LLM, vLLM)",
              "overrides": args.overrides, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "levels": levels,
              "speedup_vs_serial": {str(r["concurrency"]): round(r["tokens_per_s"] / serial, 2) for r in levels}
              if serial else None}
    path = out / f"serve_bench_{tag}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["speedup_vs_serial"]), "->", path)


if __name__ == "__main__":
    main()
