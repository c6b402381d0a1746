"""The DPO stage's step: policy and reference sequence log-probs of each pair, then `algo.dpo_loss`.

The reference is the starting model, frozen: under LoRA the same weights with the adapter switched off
(`Learner.reference_context`, no second copy); otherwise a frozen copy loaded from the starting folder,
built on the first call inside the worker (so it never travels through Ray).
"""
from __future__ import annotations

from typing import Optional

import torch


class DPOStep:
    """`fn(learner, micro_batch) -> (loss, stats)` for `Learner.train_step`; picklable by value."""

    def __init__(self, beta: float, label_smoothing: float):
        self.beta, self.label_smoothing = beta, label_smoothing
        self._reference: Optional[torch.nn.Module] = None

    def __getstate__(self):
        return {"beta": self.beta, "label_smoothing": self.label_smoothing, "_reference": None}

    def __call__(self, learner, mb: dict) -> tuple[torch.Tensor, dict]:
        from rlhf_ray.algo import dpo_loss, sequence_logprobs
        ids = torch.cat([mb["chosen_ids"], mb["rejected_ids"]])  # (2B, L): one forward for both
        mask = torch.cat([mb["chosen_mask"], mb["rejected_mask"]])
        prompt_len = torch.cat([mb["prompt_len"], mb["prompt_len"]])
        policy = sequence_logprobs(learner.forward_logits(ids, mask), ids, mask, prompt_len)  # (2B,)
        with torch.no_grad():
            ref = sequence_logprobs(self._reference_logits(learner, ids, mask), ids, mask, prompt_len)
        b = len(mb["chosen_ids"])
        return dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], self.beta, self.label_smoothing)

    def evaluate(self, learner, mb: dict) -> dict:
        """Held-out stats: preference accuracy of the implicit reward, its margin."""
        loss, stats = self(learner, mb)
        return {"loss": float(loss), "accuracy": stats["dpo/reward_acc"], "margin": stats["dpo/reward_margin"]}

    def _reference_logits(self, learner, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if learner.lora:
            with learner.reference_context():
                return learner.forward_logits(ids, mask)
        if self._reference is None:
            from rlhf_ray.learner.build import build_model
            model_cfg = learner.model_cfg.model_copy(update={"gradient_checkpointing": False})
            self._reference = build_model(model_cfg, "policy", learner.init_path, learner.backend,
                                          learner.tokenizer.pad_token_id).eval().requires_grad_(False)
        return self._reference(input_ids=ids, attention_mask=mask).logits
