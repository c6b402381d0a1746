"""Step times of the SFT and reward-model learners on this machine (one rank, no Ray, fp32).

    python benchmarks/offline_bench.py                      # tiny models, full fine-tuning
    python benchmarks/offline_bench.py --models smollm2     # SmolLM2-135M with LoRA (builds it once, ~40 s)

Each case builds a `Learner`, tokenizes the built-in task with the model's own tokenizer (SmolLM2 has a
chat template, so its rows are chat-formatted), runs `--warmup` steps, then times `--steps` optimizer
steps and reports the median and min. Batches: `--batch` rows (SFT) or pairs (RM), one micro-batch.
Two processes on 2 cores slow each other badly (STACK.md): run it alone and read results as rough.

Measured 2026-11-24 (2 cores, 2 threads, fp32, ZeRO-0, batch 8; the VM was shared, load 2-8):
  tiny (0.5M params) SFT, full FT, 240 tokens/step       median 0.014 s/step (min 0.013)
  tiny-rm RM, full FT, 8 pairs = 448 tokens/step         median 0.020 s/step (min 0.017)
  SmolLM2-135M SFT, LoRA r=8 (0.9M trainable), 432 tok   median 2.2 s/step   (min 2.1)
  SmolLM2-135M RM,  LoRA r=8, 8 pairs = 880 tokens       median 3.5 s/step   (min 3.3)
  Through the CLI on Ray (1 rank, batch 16): SFT 0.037 s/step, RM 0.045 s/step (medians of 100).
  Under heavier load (others training) the same SmolLM2 steps took 11-30 s; plain PyTorch+peft on the
  same batch measured the same as the Learner, so DeepSpeed adds no visible overhead at one rank.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from rlhf_ray.utils.capability import describe, machine_record  # noqa: E402

CASES = {
    "tiny": [("sft", "builtin:tiny", False), ("rm", "builtin:tiny-rm", False)],
    "smollm2": [("sft", "builtin:smollm2-135m", True), ("rm", "builtin:smollm2-135m", True)],
}


def run_case(stage: str, path: str, lora: bool, args) -> dict:
    import torch

    from rlhf_ray.config.schema import Config
    from rlhf_ray.data.encode import Limits, collate_preferences, collate_sft, encode_preferences, encode_sft
    from rlhf_ray.data.sources import load_rows
    from rlhf_ray.learner.learner import Learner
    from rlhf_ray.offline.stages import rm_step_loss, sft_step_loss
    from rlhf_ray.utils.device import resolve_backend

    cfg = Config.model_validate({"model": {"path": path, "lora": {"enabled": lora, "r": 8}},
                                 "data": {"num_samples": args.batch * (args.steps + args.warmup)}})
    learner_cfg = {"micro_batch_size": args.batch, "optim": {"lr": 1e-4}}
    t0 = time.perf_counter()
    learner = Learner(cfg.model, cfg.sft.learner.model_validate(learner_cfg), kind="policy" if stage == "sft" else "reward",
                      init_path=path, backend=resolve_backend("cpu"), total_updates=args.steps + args.warmup,
                      num_threads=args.threads)
    build_s = time.perf_counter() - t0
    lim = Limits(max_prompt_len=cfg.data.max_prompt_len, max_seq_len=cfg.data.max_seq_len, on_long_prompt="truncate_left")
    pad = learner.tokenizer.pad_token_id
    if stage == "sft":
        ex, _ = encode_sft(load_rows("builtin:reviews", "sft", cfg.data)[0], learner.tokenizer, lim)
        batches = [collate_sft(ex[i:i + args.batch], pad) for i in range(0, len(ex) - args.batch + 1, args.batch)]
        loss_fn = sft_step_loss
    else:
        ex, _ = encode_preferences(load_rows("builtin:reviews", "preferences", cfg.data)[0], learner.tokenizer, lim)
        batches = [collate_preferences(ex[i:i + args.batch], pad) for i in range(0, len(ex) - args.batch + 1, args.batch)]
        loss_fn = rm_step_loss
    times, losses = [], []
    for i, b in enumerate(batches[:args.warmup + args.steps]):
        t = time.perf_counter()
        losses.append(learner.train_step(loss_fn, [b])["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    tokens = int(sum(v.numel() for k, v in batches[0].items() if k.endswith("ids")))
    params = sum(p.numel() for p in learner.model.parameters())
    trainable = sum(p.numel() for p in learner.model.parameters() if p.requires_grad)
    return {"stage": stage, "model": path, "lora": lora, "params": params, "trainable": trainable,
            "batch": args.batch, "tokens_per_step": tokens, "threads": torch.get_num_threads(),
            "build_s": round(build_s, 1), "step_s_median": round(statistics.median(times), 4),
            "step_s_min": round(min(times), 4), "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny"], choices=sorted(CASES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append results as JSON lines here")
    args = ap.parse_args()
    cpu = machine_record(args.threads)  # before the learners start: the probe alone on the cores
    print(describe(cpu), flush=True)
    for name in args.models:
        for stage, path, lora in CASES[name]:
            res = {**run_case(stage, path, lora, args), "cpu": cpu}
            print(json.dumps(res), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
