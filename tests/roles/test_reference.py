"""The reference scorer runs each distinct prompt once (`rlhf_ray.models.shared_prompt`) and returns the
plain forward's log-probs. Tokens are counted at the model's input embedding: every token any forward runs
passes through it once."""
import torch

from rlhf_ray.batch import pack_sequences, response_logits
from rlhf_ray import algo
from rlhf_ray.models.kit import resolve_model_path
from rlhf_ray.models.packed import pack_responses
from rlhf_ray.models.shared_prompt import distinct_prompts
from rlhf_ray.roles.reference import ReferenceScorer

PROMPTS = [[11, 12, 13, 14, 15, 16], [21, 22, 23]]
N = 3


def test_reference_runs_each_distinct_prompt_once_and_matches_the_plain_forward():
    ref = ReferenceScorer(resolve_model_path("builtin:tiny"), micro_batch_size=64)
    g = torch.Generator().manual_seed(0)
    seq = pack_sequences([p for p in PROMPTS for _ in range(N)],
                         [torch.randint(3, 200, (k,), generator=g).tolist() for k in (4, 2, 5, 3, 1, 5)],
                         pad_id=ref.model.config.pad_token_id or 0)
    B, P, T, G = len(seq), seq.prompt_len, seq.response_mask.shape[1], len(PROMPTS)
    seen: list[int] = []
    handle = ref.model.get_input_embeddings().register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].numel()))
    try:
        got = ref.logprobs(seq)
    finally:
        handle.remove()
    # each prompt but its last token once, then every row's last prompt token and its response but the last,
    # packed without their padding (rlhf_ray.models.packed): fewer positions than the padded B x T
    _, inverse = distinct_prompts(seq)
    packed = pack_responses(seq, inverse, max_prompt_keys=max(P - 1, T)).input_ids.numel()
    assert sum(seen) == G * (P - 1) + packed and packed < B * T, seen
    with torch.no_grad():
        logits = ref.model(input_ids=seq.input_ids, attention_mask=seq.attention_mask,
                           position_ids=seq.position_ids).logits
    want = algo.token_logprobs(response_logits(logits, seq), seq.response_ids, 1.0)
    mask = seq.response_mask.bool()
    assert got.shape == want.shape and (got - want)[mask].abs().max() < 1e-5
