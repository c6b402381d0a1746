"""The reference scorer: log-probs of the frozen initial policy, for the KL term.

Under LoRA there is no separate reference: the policy learner computes reference log-probs with its
adapter switched off (`PolicyWorker.ref_logprobs`). Without LoRA, this frozen copy runs in its own actor
(distributed) or in the colocated process.
"""
from __future__ import annotations

import ray
import torch

from rlhf_ray import algo
from rlhf_ray.batch import SequenceBatch
from rlhf_ray.dispatch import per_token_over_micro_batches, scoring_micro_batches
from rlhf_ray.models.packed import mask_dtype
from rlhf_ray.models.shared_prompt import response_logits_of
from rlhf_ray.utils.device import attention_kwargs, on_device
from rlhf_ray.utils.phases import set_phase_threads, timed


class ReferenceScorer:
    def __init__(self, path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 temperature: float = 1.0, micro_batch_size: int = 64, max_tokens_per_micro_batch: int | None = None):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, **attention_kwargs(device, dtype))
        self.model.to(device).eval()
        self.model.requires_grad_(False)
        self.device, self.temperature, self.mbs = device, temperature, micro_batch_size
        self.max_tokens = max_tokens_per_micro_batch  # reference.max_tokens_per_micro_batch; None: mbs rows
        self.pack_dtype = mask_dtype(self.model)  # rows without shared prompts packed (rlhf_ray.models.packed)

    @torch.no_grad()
    def logprobs(self, seq: SequenceBatch, team=None) -> torch.Tensor:
        """(B, T) log pi_ref of the response tokens, computed in micro-batches (of rows, or of tokens), each
        one's rows split over `team` (`rlhf_ray.utils.phases.CoreTeam`; None: one pass)."""
        def logprobs_of(mb: SequenceBatch) -> torch.Tensor:
            logits = response_logits_of(self._call, mb, pack_dtype=self.pack_dtype)
            return algo.token_logprobs(logits, mb.response_ids, self.temperature).cpu()
        return per_token_over_micro_batches(seq, scoring_micro_batches(seq, self.mbs, self.max_tokens), logprobs_of,
                                            team, packed=self.pack_dtype is not None)

    def _call(self, **kwargs):
        return self.model(**on_device(kwargs, self.device))


@ray.remote
class ReferenceActor:
    """Ray shell of `ReferenceScorer` (distributed placement, full fine-tuning)."""

    def __init__(self, *args, **kwargs):
        self.s = ReferenceScorer(*args, **kwargs)

    def ref_logprobs(self, seq, threads: int = 0):
        set_phase_threads(threads)
        return timed(self.s.logprobs, seq)
