"""Small builders shared by the learner tests (tiny model, fixed token batches)."""
from __future__ import annotations

import torch

from rlhf_ray.config.schema import LearnerConfig, ModelConfig
from rlhf_ray.learner.learner import Learner
from rlhf_ray.utils.device import resolve_backend


def model_cfg(lora: bool = False, qlora: bool = False) -> ModelConfig:
    return ModelConfig(path="builtin:tiny", lora={"enabled": lora or qlora, "r": 4},
                       quantization={"load_in_4bit": qlora})


def learner_cfg(zero: int = 0, lr: float = 3e-3, **kw) -> LearnerConfig:
    return LearnerConfig(micro_batch_size=4, optim={"lr": lr, "scheduler": "linear", "warmup_steps": 1},
                         deepspeed={"zero_stage": zero}, **kw)


def make_learner(kind="policy", lora=False, qlora=False, zero=0, total_updates=20, lr=3e-3, init="builtin:tiny"):
    return Learner(model_cfg(lora, qlora), learner_cfg(zero, lr), kind=kind, init_path=init,
                   backend=resolve_backend("cpu"), total_updates=total_updates, seed=0, num_threads=2)


def token_batches(n: int, rows: int = 8, length: int = 12, seed: int = 0) -> list[dict]:
    """Batches with a learnable pattern (token t+1 = token t + 1) so the loss visibly falls."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(3, 40, (rows, 1), generator=g)
        ids = start + torch.arange(length)
        mask = torch.ones_like(ids)
        loss_mask = torch.ones_like(ids)
        loss_mask[:, :3] = 0  # a "prompt" of 3 tokens
        out.append({"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask})
    return out


def split(batch: dict, size: int = 4) -> list[dict]:
    from rlhf_ray.dispatch import micro_batches
    return micro_batches(batch, size)


@torch.no_grad()
def plain_logprobs(learner: Learner, seq) -> torch.Tensor:
    """(B, T) log-probs of the response tokens from one plain forward over whole rows (every position's
    logits, no shared prompts), masked: the reference the learner's own paths are checked against."""
    from rlhf_ray import algo
    from rlhf_ray.batch import response_logits
    learner.ds_engine.eval()
    logits = learner.forward_logits(seq.input_ids, seq.attention_mask, seq.position_ids).float()
    return algo.token_logprobs(response_logits(logits, seq), seq.response_ids, 1.0) * seq.response_mask
