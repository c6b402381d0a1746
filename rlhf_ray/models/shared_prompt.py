"""Response logits that compute each distinct prompt once.

A GRPO-family batch holds every prompt n times, one row per sample. Under causal attention a prompt's
hidden states do not depend on the response after it, so the forward runs each distinct prompt once,
keeps its keys and values (the model's own KV cache), gathers them to every row of its group and runs
only the responses on top. The result equals the plain forward up to float rounding, and the backward
flows through the gathered cache into the prompt pass, so LoRA and full fine-tuning train as before.
For SmolLM2-135M with about 50-token chat prompts, 48-token responses and groups of 4, a forward runs
about 40% fewer tokens (the same idea as "Prefix Grouper", Liu et al. 2025).

One layout and one caller contract: `call(**model_kwargs)` runs the model and returns its HF output.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from rlhf_ray.batch import SequenceBatch, logits_to_keep, response_logits

ModelCall = Callable[..., object]


def distinct_prompts(seq: SequenceBatch) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(first row of each distinct prompt (G,), each row's prompt index (B,)), or None when no two rows
    share a prompt (PPO with one sample per prompt: nothing to share)."""
    p = seq.prompt_len
    prompts = torch.cat([seq.input_ids[:, :p], seq.attention_mask[:, :p]], dim=1)
    unique, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    if len(unique) == len(seq):
        return None
    first = torch.full((len(unique),), len(seq), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(seq)), reduce="amin")
    return first, inverse


def can_share(model: torch.nn.Module) -> bool:
    """Whether `model` keeps a KV cache in its current mode: HF's gradient-checkpointed layers drop it in
    training mode (they recompute in the backward), so such a model runs the plain forward there."""
    return not (model.training and bool(getattr(model, "is_gradient_checkpointing", False)))


def response_logits_of(call: ModelCall, seq: SequenceBatch, share_prompts: bool = True) -> torch.Tensor:
    """(B, T, V) logits that predict each response token; the LM head runs over response positions only.
    share_prompts=False (see `can_share`) runs the plain forward."""
    found = distinct_prompts(seq) if share_prompts else None
    if found is None:
        return response_logits(call(input_ids=seq.input_ids, attention_mask=seq.attention_mask,
                                    position_ids=seq.position_ids, logits_to_keep=logits_to_keep(seq)).logits, seq)
    first, inverse = found
    p = seq.prompt_len
    head = call(input_ids=seq.input_ids[first, :p], attention_mask=seq.attention_mask[first, :p],
                position_ids=seq.position_ids[first, :p], use_cache=True, logits_to_keep=1)
    cache = head.past_key_values
    cache.reorder_cache(inverse)  # every row gets its prompt's keys and values (differentiable gather)
    tail = call(input_ids=seq.input_ids[:, p:], attention_mask=seq.attention_mask,
                position_ids=seq.position_ids[:, p:], past_key_values=cache, use_cache=True)
    # the prompt's last position predicts the first response token; response position t predicts t + 1
    first_token = head.logits.index_select(0, inverse.to(head.logits.device))
    return torch.cat([first_token, tail.logits[:, :-1]], dim=1)
