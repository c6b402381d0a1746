"""The learner's precision paths on a GPU: full fine-tuning in fp32 and bf16, LoRA, and QLoRA (NF4 base), each
under DeepSpeed as a run builds it, on a random-weight model of SmolLM2-135M's shape (no download).

For each path, on a GRPO-shaped batch (3 prompts of different lengths, left-padded, 4 samples each, ragged
responses): the prompt-sharing forward against the plain forward (max and mean |log-prob diff| over response
tokens; eval mode), the adapter-off reference against the adapter-on policy before any step (LoRA starts at
B = 0, so they must agree exactly), one train step (finite loss and gradient norm, the policy moves), and
the weights handed to the generator (`named_weights`: dtype and device). After each path the learner is
freed as a shared Ray Train run frees a finished stage's before the next stage builds its own
(`Learner.close`, then `offline.worker._free_memory`): `left_after_free_mib` is the device memory still allocated then, against
before the learner was built. Writes JSON.

    python benchmarks/cuda_paths.py [--device cuda] [--out benchmarks/results/cuda_paths.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                "max_position_embeddings": 2048, "tie_word_embeddings": True, "rope_theta": 100000.0,
                "rms_norm_eps": 1e-5}
PATHS = {
    "full fp32": dict(dtype="float32", lora=False, qlora=False),
    "full bf16": dict(dtype="bfloat16", lora=False, qlora=False),
    "lora bf16": dict(dtype="bfloat16", lora=True, qlora=False),
    "qlora nf4 + bf16": dict(dtype="bfloat16", lora=True, qlora=True),
}


def grouped_batch(vocab: int, n: int = 4):
    from rlhf_ray.batch import pack_sequences
    g = torch.Generator().manual_seed(1)
    rows_p, rows_r = [], []
    for plen in (40, 17, 29):
        prompt = torch.randint(3, vocab, (plen,), generator=g).tolist()
        for _ in range(n):
            rows_p.append(prompt)
            rows_r.append(torch.randint(3, vocab, (int(torch.randint(8, 33, (1,), generator=g)),), generator=g).tolist())
    return pack_sequences(rows_p, rows_r, pad_id=0)


def check(name: str, spec: dict, folder: str, device: str) -> dict:
    from rlhf_ray.algo.logprobs import token_logprobs
    from rlhf_ray.batch import logits_to_keep, response_logits
    from rlhf_ray.config.schema import LearnerConfig, ModelConfig
    from rlhf_ray.learner.learner import Learner
    from rlhf_ray.roles.losses import forward_response_logits
    from rlhf_ray.utils.device import make_backend

    mcfg = ModelConfig(path=folder, dtype=spec["dtype"], lora={"enabled": spec["lora"], "r": 16},
                       quantization={"load_in_4bit": spec["qlora"]})
    lcfg = LearnerConfig(micro_batch_size=12, optim={"lr": 1e-4}, deepspeed={"zero_stage": 2})
    t = time.perf_counter()
    ln = Learner(mcfg, lcfg, kind="policy", init_path=folder, backend=make_backend(device, spec["dtype"]),
                 total_updates=4)
    load_s = time.perf_counter() - t
    seq = grouped_batch(ln.hf_model.config.vocab_size)
    tokens = seq.response_ids.to(ln.ds_engine.device)
    mask = seq.response_mask.bool().to(ln.ds_engine.device)

    def logprobs(share: bool) -> torch.Tensor:
        if share:
            return token_logprobs(forward_response_logits(ln, seq), tokens)
        logits = ln.forward(input_ids=seq.input_ids, attention_mask=seq.attention_mask,
                            position_ids=seq.position_ids, logits_to_keep=logits_to_keep(seq)).logits
        return token_logprobs(response_logits(logits, seq), tokens)

    ln.ds_engine.eval()
    with torch.no_grad():
        shared, plain = logprobs(True), logprobs(False)
        ref = None
        if spec["lora"]:
            with ln.reference_context():
                ref = logprobs(True)
    diff = (shared - plain)[mask].abs()

    def loss_fn(learner, _mb):
        lp = token_logprobs(forward_response_logits(learner, seq), tokens)
        adv = torch.linspace(-1, 1, len(seq), device=lp.device)[:, None]
        return -(lp * adv)[mask].mean(), {}

    t = time.perf_counter()
    stats = ln.train_step(loss_fn, [{"idx": torch.arange(len(seq))}])
    if device == "cuda":
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t
    ln.ds_engine.eval()
    with torch.no_grad():
        after = logprobs(True)
    mode = "adapter" if spec["lora"] else "full"
    sent = list(ln.named_weights(mode))
    out = {
        "path": name, "load_s": round(load_s, 2), "step_s": round(step_s, 3),
        "shared_vs_plain_max": float(diff.max()), "shared_vs_plain_mean": float(diff.mean()),
        "reference_vs_policy_before_step_max": None if ref is None else float((ref - shared)[mask].abs().max()),
        "loss": stats.get("loss"), "grad_norm": stats.get("grad_norm"),
        "moved_mean_abs_logprob": float((after - shared)[mask].abs().mean()),
        "sync_tensors": len(sent), "sync_dtypes": sorted({str(t.dtype) for _, t in sent}),
        "sync_devices": sorted({str(t.device) for _, t in sent}),
        "sync_mib": round(sum(t.numel() * t.element_size() for _, t in sent) / 2 ** 20, 1),
    }
    print(json.dumps(out), flush=True)
    ln.close()
    del ln
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--folder", default="/tmp/rlhf_ray_random_smollm2")
    ap.add_argument("--paths", nargs="*", default=list(PATHS))
    ap.add_argument("--out", default="benchmarks/results/cuda_paths.json")
    args = ap.parse_args()
    from benchmarks.cuda_memory import build_random_model
    build_random_model(SMOLLM2_135M, Path(args.folder), args.device)
    from rlhf_ray.offline.worker import _free_memory
    results = []
    for path in args.paths:
        before = torch.cuda.memory_allocated() if args.device == "cuda" else 0
        results.append(check(path, PATHS[path], args.folder, args.device))
        _free_memory()
        if args.device == "cuda":
            results[-1]["left_after_free_mib"] = round((torch.cuda.memory_allocated() - before) / 2 ** 20, 1)
            results[-1]["reserved_after_free_mib"] = round(torch.cuda.memory_reserved() / 2 ** 20, 1)
            print(json.dumps({k: results[-1][k] for k in ("path", "left_after_free_mib",
                                                          "reserved_after_free_mib")}), flush=True)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": gpu, "torch": torch.__version__, "paths": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
