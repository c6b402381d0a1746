"""Work, not time: GEMM FLOPs of one GRPO step's learner passes on SmolLM2-135M + LoRA r16 (q/k/v/o),
32 rows (8 prompts x 4 samples) x (P prompt + 48 response) tokens, three ways: the LM head over every
position; over the response positions only (`logits_to_keep`); and, on top, each distinct prompt computed
once through the KV cache (`rlhf_ray.models.shared_prompt`, what the learner and the reference run).
Counted with torch's FlopCounterMode on 2 prompts x 4 samples and scaled to 32 rows, so it runs in seconds
and does not depend on how loaded the machine is.

    python benchmarks/step_flops.py [--prompt-len 64]
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

ROWS, GROUP, COUNTED, NEW = 32, 4, 8, 48


def flops(model, seq, way: str, grad: bool) -> float:
    """GFLOP of a forward (and backward) over `seq` for a step of ROWS rows."""
    from rlhf_ray.batch import response_logits
    from rlhf_ray.models.shared_prompt import response_logits_of
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(grad):
        if way == "all positions":
            logits = response_logits(model(input_ids=seq.input_ids, attention_mask=seq.attention_mask,
                                           position_ids=seq.position_ids).logits, seq)
        else:
            logits = response_logits_of(lambda **kw: model(**kw), seq, share_prompts=way == "shared prompts")
        logp = torch.log_softmax(logits.float(), -1).gather(-1, seq.response_ids.unsqueeze(-1)).sum()
        if grad:
            logp.backward()
    return counter.get_total_flops() * ROWS / COUNTED / 1e9


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf_ray.batch import pack_sequences
    from rlhf_ray.models.kit import resolve_model_path
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=64)
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:smollm2-135m"), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    v = model.config.vocab_size
    prompts = [torch.randint(0, v, (args.prompt_len,)).tolist() for _ in range(COUNTED // GROUP)]
    seq = pack_sequences([p for p in prompts for _ in range(GROUP)],
                         [torch.randint(0, v, (NEW,)).tolist() for _ in range(COUNTED)], pad_id=0)
    ways = ("all positions", "response only", "shared prompts")
    for name, grad in (("reference forward", False), ("update fwd+bwd", True)):
        counts = [flops(model, seq, w, grad) for w in ways]
        print(f"{name:18} " + ", ".join(f"{w} {c:7.1f}" for w, c in zip(ways, counts)) +
              f" GFLOP ({1 - counts[-1] / counts[0]:.1%} less than all positions)")
    print(f"fp32 logits per step: {ROWS * (args.prompt_len + NEW) * v * 4 / 2**20:.0f} MiB -> "
          f"{ROWS * (NEW + 1) * v * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
