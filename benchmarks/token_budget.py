"""Token-budget micro-batches against row-count micro-batches on responses of mixed length.

The real policy role on the real DeepSpeed learner (CPU, fp32): one PPO update (forward + backward over a
GRPO batch, one optimizer step) and one scoring pass (`PolicyWorker.logprobs`) per repeat, three ways:

    rows_full_width   `micro_batch_size` rows, every micro-batch padded to the batch's longest response
                      (what a micro-batch cost before `SequenceBatch.trimmed`)
    rows              `micro_batch_size` rows, each micro-batch at its own width
    tokens            `max_tokens_per_micro_batch` = micro_batch_size x (prompt + max_new_tokens): the row
                      batching's worst-case micro-batch, so the same peak activation memory

The responses: most prompts' samples short, a few long (a long tail, as sampled responses are), each group of
samples kept together. The log-probs of the three ways are checked equal (float rounding).

    .venv/bin/python benchmarks/token_budget.py [--model builtin:tiny] [--repeats 5] [--threads 1]

The three ways interleave within each repeat, so a machine whose load changes slows all three alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from rlhf_ray.batch import SequenceBatch, minibatches, pack_sequences
from rlhf_ray.config import load_config
from rlhf_ray.config.schema import LearnerConfig, ModelConfig
from rlhf_ray.learner.learner import Learner
from rlhf_ray.records import TrainBatch
from rlhf_ray.roles.policy import PolicyWorker
from rlhf_ray.utils.capability import machine_record
from rlhf_ray.utils.device import resolve_backend

HERE = Path(__file__).resolve().parent


def mixed_batch(prompts: int, n: int, prompt_len: int, max_new: int, vocab: int, seed: int = 0) -> TrainBatch:
    """A GRPO batch: `prompts` groups of `n` samples; 3 in 4 groups answer in 4-24 tokens, 1 in 4 has samples
    up to `max_new` (a long tail)."""
    g = torch.Generator().manual_seed(seed)
    p_ids, r_ids = [], []
    for i in range(prompts):
        p = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        hi = max_new if i % 4 == 3 else 24
        for _ in range(n):
            length = int(torch.randint(4, hi + 1, (1,), generator=g))
            p_ids.append(p)
            r_ids.append(torch.randint(3, vocab, (length,), generator=g).tolist())
    seq = pack_sequences(p_ids, r_ids, 0)
    mask = seq.response_mask
    old = -torch.rand(mask.shape, generator=g) * 3 * mask
    adv = torch.randn(len(seq), 1, generator=g) * mask
    return TrainBatch(seq, old, old.clone(), adv, adv.clone(), None)


@contextmanager
def full_width():
    """Micro-batches padded to the whole batch's width, as before `trimmed` existed."""
    seq_trim, tb_trim = SequenceBatch.trimmed, TrainBatch.trimmed
    SequenceBatch.trimmed = lambda self: self
    TrainBatch.trimmed = lambda self: self
    try:
        yield
    finally:
        SequenceBatch.trimmed, TrainBatch.trimmed = seq_trim, tb_trim


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=192)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results" / "token_budget.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())
    budget = args.micro * (args.prompt_len + args.max_new)
    learner = Learner(ModelConfig(path=args.model), LearnerConfig(micro_batch_size=args.micro, optim={"lr": 1e-6}),
                      kind="policy", init_path=args.model, backend=resolve_backend("cpu"), total_updates=1000,
                      seed=0, num_threads=args.threads)
    vocab = learner.hf_model.config.vocab_size
    batch = mixed_batch(args.prompts, args.samples, args.prompt_len, args.max_new, vocab)
    cfg = load_config(None, ["reference.kl_coef=0"])
    # one epoch of one minibatch: the whole batch, groups shuffled and kept whole (as the controller draws it)
    minibatch = [minibatches(len(batch.seq), len(batch.seq), torch.Generator().manual_seed(0), group=args.samples)]
    ways = {"rows_full_width": (None, True), "rows": (None, False), "tokens": (budget, False)}
    workers = {}
    for name, (max_tokens, _) in ways.items():
        workers[name] = PolicyWorker(learner, cfg.algorithm, cfg.reference, temperature=1.0, norm_len=args.max_new)
        workers[name].max_tokens = max_tokens
    logps = {}  # on the same weights, before any update
    for name, (_, full) in ways.items():
        with full_width() if full else _nothing():
            logps[name] = workers[name].logprobs(batch.seq)
    results = {}
    for rep in range(args.repeats + 1):  # the first round warms up
        for name, (_, full) in ways.items():
            with full_width() if full else _nothing():
                t0 = time.perf_counter()
                workers[name].update(batch, minibatch, kl_coef=0.0)
                t1 = time.perf_counter()
                workers[name].logprobs(batch.seq)
                t2 = time.perf_counter()
            if rep == 0:
                continue
            r = results.setdefault(name, {"update_s": [], "logprobs_s": []})
            r["update_s"].append(t1 - t0)
            r["logprobs_s"].append(t2 - t1)
    mask = batch.seq.response_mask.bool()
    agree = {n: float((logps[n] - logps["rows_full_width"]).abs()[mask].max()) for n in ways}
    summary = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    fastest = {n: {k: min(v) for k, v in r.items()} for n, r in results.items()}
    lengths = batch.seq.response_mask.sum(-1)
    record = {
        "what": "PolicyWorker.update (1 optimizer step over the batch) and .logprobs, real DeepSpeed learner, fp32",
        "model": args.model, "prompts": args.prompts, "samples": args.samples, "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new, "micro_batch_size": args.micro, "max_tokens_per_micro_batch": budget,
        "response_len": {"mean": float(lengths.mean()), "max": int(lengths.max()), "min": int(lengths.min())},
        "repeats": args.repeats, "threads": args.threads, "median_s": summary, "min_s": fastest, "all_s": results,
        # other processes' load while it ran (a shared 2-core machine): the min is the less disturbed number
        "loadavg_before": load_before, "loadavg_after": list(os.getloadavg()),
        "speedup_vs_rows_full_width": {n: {k: summary["rows_full_width"][k] / s[k] for k in s} for n, s in summary.items()},
        "speedup_tokens_vs_rows": {k: summary["rows"][k] / summary["tokens"][k] for k in summary["rows"]},
        "speedup_tokens_vs_rows_min": {k: fastest["rows"][k] / fastest["tokens"][k] for k in fastest["rows"]},
        "logprob_max_abs_diff_vs_rows_full_width": agree,
        "cpu": machine_record(args.threads),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    for n, s in summary.items():
        print(f"{n:16s} update {s['update_s']:.3f} s (min {fastest[n]['update_s']:.3f})  logprobs "
              f"{s['logprobs_s']:.3f} s (min {fastest[n]['logprobs_s']:.3f})")
    print(f"tokens vs rows: {record['speedup_tokens_vs_rows']}; log-prob max |diff| {agree}")
    print(f"cpu: {record['cpu'].get('model')}; wrote {args.out}")


@contextmanager
def _nothing():
    yield


if __name__ == "__main__":
    main()
