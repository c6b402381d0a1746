"""Work, not time: GEMM FLOPs of one GRPO step's learner passes on SmolLM2-135M + LoRA r16 (q/k/v/o),
32 rows x (P prompt + 48 response) tokens, with the LM head over every position (before) and over the
response positions only (`rlhf_ray.rl.micro.forward_response_logits`). Counted with torch's FlopCounterMode on
4 rows and scaled to 32, so it runs in seconds and does not depend on how loaded the machine is.

    python benchmarks/step_flops.py [--prompt-len 64]
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

ROWS, COUNTED, NEW = 32, 4, 48


def flops(model, ids: torch.Tensor, prompt_len: int, response_only: bool, grad: bool) -> float:
    """GFLOP of a forward (and backward) over `ids` for a step of ROWS rows."""
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(grad):
        kw = {"logits_to_keep": NEW + 1} if response_only else {}
        logits = model(input_ids=ids, **kw).logits
        logits = logits[:, :NEW] if response_only else logits[:, prompt_len - 1:prompt_len - 1 + NEW]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, prompt_len:].unsqueeze(-1)).sum()
        if grad:
            logp.backward()
    return counter.get_total_flops() * ROWS / COUNTED / 1e9


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf_ray.models.kit import resolve_model_path
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=64)
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:smollm2-135m"), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    ids = torch.randint(0, model.config.vocab_size, (COUNTED, args.prompt_len + NEW))
    for name, grad in (("reference forward", False), ("update fwd+bwd", True)):
        before, after = (flops(model, ids, args.prompt_len, k, grad) for k in (False, True))
        print(f"{name:18} all positions {before:7.1f} GFLOP, response only {after:7.1f} GFLOP "
              f"({1 - after / before:.1%} less)")
    vocab = model.config.vocab_size
    print(f"fp32 logits per step: {ROWS * (args.prompt_len + NEW) * vocab * 4 / 2**20:.0f} MiB -> "
          f"{ROWS * (NEW + 1) * vocab * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
