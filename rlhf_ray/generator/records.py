"""The generator's output record (its tensor form for the learner is `rlhf_ray.batch.pack_sequences`).

Symbols: P prompts in a call, n samples per prompt, B = P * n samples, T_b the length of sample b's
response, Lp_b the length of its prompt.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rollout:
    """B sampled responses; every list has length B, samples of one prompt are contiguous (n each).

    prompt_ids[b]:         Lp_b token ids of the prompt that sample b answers (repeated for each sample).
    response_ids[b]:       T_b sampled token ids (stop/EOS token included when the model emitted it).
    response_logprobs[b]:  T_b floats, log softmax(logits / temperature)[token] of each sampled token,
                           under the weights of `weight_version` (vLLM `logprobs_mode="processed_logprobs"`);
                           with temperature 0 (greedy) the temperature is taken as 1.
    texts[b]:              the decoded response.
    prompt_index[b]:       index of the prompt in the `generate` call's prompt list (0..P-1).
    finish_reasons[b]:     "stop" (EOS or a stop string) or "length" (max_new_tokens reached).
    weight_version:        the version of the weights every sample was generated with.
    temperature:           the sampling temperature the log-probs are scaled with.
    generate_s:            seconds the engine spent inside vLLM (the slowest engine's, for a group);
                           the controller subtracts it from the phase's wall time to measure overhead.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    response_logprobs: list[list[float]]
    texts: list[str]
    prompt_index: list[int]
    finish_reasons: list[str]
    weight_version: int
    temperature: float
    generate_s: float = 0.0

    def __len__(self) -> int:
        return len(self.response_ids)


def concat_rollouts(parts: list[Rollout], prompt_offsets: list[int]) -> Rollout:
    """Join per-engine rollouts in order; `prompt_offsets[i]` shifts part i's prompt_index to the global one."""
    if not parts:
        raise ValueError("no rollouts to concatenate")
    versions = {p.weight_version for p in parts}
    if len(versions) != 1:
        raise ValueError(f"engines answered with different weight versions {sorted(versions)}: a sync is incomplete")
    return Rollout(
        prompt_ids=[x for p in parts for x in p.prompt_ids],
        response_ids=[x for p in parts for x in p.response_ids],
        response_logprobs=[x for p in parts for x in p.response_logprobs],
        texts=[x for p in parts for x in p.texts],
        prompt_index=[i + off for p, off in zip(parts, prompt_offsets) for i in p.prompt_index],
        finish_reasons=[x for p in parts for x in p.finish_reasons],
        weight_version=versions.pop(),
        temperature=parts[0].temperature,
        generate_s=max(p.generate_s for p in parts),
    )
