"""Calibrate the memory plan's learner lines against real CUDA memory (needs a GPU for the numbers; no download).

A random-weight model is built from the config's config.json (shipped in rlhf_ray/placement/known_models for
hub ids), saved once, and loaded by the learner exactly as a run loads it (`Learner`: the NF4 base + LoRA under
DeepSpeed when the config says so). Then one RL step's learner phases run twice at the config's micro-batch
and lengths (data.max_prompt_len + rollout.max_new_tokens): the reference pass (adapter off, no grad) and a
train step (a GRPO-shaped loss through `roles.losses.forward_response_logits`). The rows of a micro-batch share
their prompt, as a GRPO group does. Printed and written to JSON: torch's allocator (allocated after each
phase, the peak within it) and the seconds of the second pass, beside the plan's learner items.
The engine's lines (vLLM) are not measured here.

    python benchmarks/cuda_memory.py configs/gpu/llama3.1-8b-qlora-4090.yaml [--set key=value ...] [--out F]
    --device cpu --model-json F: a dry run of the same code on CPU (no memory numbers).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

GiB = 2 ** 30


def build_random_model(config_json: dict, folder: Path, device: str) -> None:
    """A HF folder with random bf16 weights of this config.json and the built-in tokenizer (ids only matter)."""
    if (folder / ".complete").exists():
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_ray.models.kit import build_tokenizer
    d = {k: v for k, v in config_json.items() if k not in ("architectures", "torch_dtype", "dtype")}
    conf = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    build_tokenizer(folder)
    (folder / ".complete").write_text("ok\n")


def group_batch(rows: int, prompt_len: int, new_tokens: int, vocab: int, pad: int):
    """`rows` samples of one prompt (a GRPO group), every position real."""
    from rlhf_ray.batch import SequenceBatch
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, prompt_len), generator=g).expand(rows, -1)
    response = torch.randint(3, vocab, (rows, new_tokens), generator=g)
    ids = torch.cat([prompt, response], 1)
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1]).expand(rows, -1)
    return SequenceBatch(ids, mask, pos, torch.ones(rows, new_tokens), prompt_len)


class Meter:
    """Allocated / peak GiB of a phase on CUDA; wall seconds everywhere."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / GiB
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t
        if self.cuda:
            self.after = torch.cuda.memory_allocated() / GiB
            self.peak = torch.cuda.max_memory_allocated() / GiB
        return False

    def record(self) -> dict:
        out = {"seconds": round(self.seconds, 3)}
        if self.cuda:
            out |= {"allocated_before_gib": round(self.before, 3), "allocated_after_gib": round(self.after, 3),
                    "peak_gib": round(self.peak, 3), "peak_above_before_gib": round(self.peak - self.before, 3)}
        return out


def plan_items(cfg) -> list[dict]:
    """The plan's line items of the process that holds the policy (GiB per phase)."""
    from rlhf_ray.placement.budget import budget
    from rlhf_ray.placement.memory import PHASES
    from rlhf_ray.placement.plan import place
    from rlhf_ray.placement.report import model_config
    plan, _ = budget(cfg, place(cfg), model_config)
    items = next(iter(plan.memory.values()))
    return [{"role": i.role, "item": i.name, "host": i.host,
             **{p: round(i.bytes / GiB if p in i.phases else 0.0, 3) for p in PHASES}} for i in items]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model-json", help="config.json to build from (default: the config's model.path, shipped)")
    ap.add_argument("--folder", default="/tmp/rlhf_ray_random_model")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default="benchmarks/results/cuda_memory.json")
    args = ap.parse_args()

    from rlhf_ray.config.load import load_config
    from rlhf_ray.learner.learner import Learner
    from rlhf_ray.placement.shapes import known_config
    from rlhf_ray.roles.losses import forward_response_logits
    from rlhf_ray.algo.logprobs import token_logprobs
    from rlhf_ray.utils.device import make_backend

    cfg = load_config(args.config, args.overrides)
    planned = plan_items(cfg)
    config_json = json.loads(Path(args.model_json).read_text()) if args.model_json else known_config(cfg.model.path)
    if config_json is None:
        raise SystemExit(f"no shipped config.json for {cfg.model.path}; pass --model-json")
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    with Meter(args.device) as m_build:
        build_random_model(config_json, folder, args.device)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if args.device == "cuda" else "float32")
    backend = make_backend(args.device, dtype)

    with Meter(args.device) as m_load:
        learner = Learner(cfg.model, cfg.rl.policy, kind="policy", init_path=str(folder), backend=backend,
                          total_updates=10)
    micro = cfg.rl.policy.micro_batch_size
    seq = group_batch(micro, cfg.data.max_prompt_len, cfg.rollout.max_new_tokens, config_json["vocab_size"],
                      learner.tokenizer.pad_token_id)

    def logprobs(ln) -> torch.Tensor:
        return token_logprobs(forward_response_logits(ln, seq), seq.response_ids.to(ln.ds_engine.device))

    def loss_fn(ln, _mb):
        lp = logprobs(ln)
        adv = torch.linspace(-1, 1, len(seq), device=lp.device)[:, None]
        return -(lp * adv).mean(), {}

    passes = []
    for i in range(2):
        learner.ds_engine.eval()
        with Meter(args.device) as m_ref, torch.no_grad(), learner.reference_context():
            ref = logprobs(learner)
        with Meter(args.device) as m_train:
            stats = learner.train_step(loss_fn, [{"idx": torch.arange(micro)}])
        learner.ds_engine.eval()
        with torch.no_grad():
            live = logprobs(learner)
        passes.append({"reference": m_ref.record(), "train": m_train.record(), "loss": stats.get("loss"),
                       "grad_norm": stats.get("grad_norm"),
                       "policy_moved_max_abs_logprob": float((live - ref).abs().max())})
        print(f"pass {i}: reference {m_ref.record()}\n        train {m_train.record()}  loss {stats.get('loss')}",
              flush=True)
    # the prompt-sharing forward against the plain one, on this device and dtype (eval mode, adapter on)
    from rlhf_ray.batch import logits_to_keep, response_logits
    with torch.no_grad():
        shared = token_logprobs(forward_response_logits(learner, seq), seq.response_ids.to(learner.ds_engine.device))
        plain_logits = response_logits(learner.forward(
            input_ids=seq.input_ids, attention_mask=seq.attention_mask, position_ids=seq.position_ids,
            logits_to_keep=logits_to_keep(seq)).logits, seq)
        plain = token_logprobs(plain_logits, seq.response_ids.to(learner.ds_engine.device))
    result = {
        "label": args.label, "config": args.config, "overrides": args.overrides, "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "micro_batch": micro,
        "tokens_per_row": cfg.data.max_prompt_len + cfg.rollout.max_new_tokens,
        "build_random_model_s": round(m_build.seconds, 1), "load": m_load.record(), "passes": passes,
        "shared_vs_plain_max_abs_logprob": float((shared - plain).abs().max()),
        "plan_items": planned,
    }
    if args.device == "cuda":
        free, total = torch.cuda.mem_get_info()
        result["device_used_gib"] = round((total - free) / GiB, 3)
        result["reserved_peak_gib"] = round(torch.cuda.max_memory_reserved() / GiB, 3)
    print(json.dumps({k: v for k, v in result.items() if k != "plan_items"}, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text()) if out.exists() else []
    runs = [r for r in runs if r.get("label") != args.label] + [result]
    out.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
