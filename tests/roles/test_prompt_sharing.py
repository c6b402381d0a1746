"""Prompt sharing on the real training path: a policy learner's update and log-prob forwards run each
distinct prompt once (`rlhf_ray.roles.losses.forward_response_logits` -> `rlhf_ray.models.shared_prompt`).
Counted at the model's input embedding: every token any forward runs passes through it once."""
import pytest
import torch

from rlhf_ray.batch import pack_sequences
from rlhf_ray.config.schema import AlgorithmConfig, LearnerConfig, ReferenceConfig
from rlhf_ray.learner.learner import Learner
from rlhf_ray.models.packed import pack_responses
from rlhf_ray.models.shared_prompt import distinct_prompts
from rlhf_ray.roles.policy import PolicyWorker
from rlhf_ray.records import TrainBatch
from rlhf_ray.utils.device import resolve_backend
from tests.learner.helpers import model_cfg, plain_logprobs

pytestmark = pytest.mark.slow

PROMPTS = [[11, 12, 13, 14, 15, 16], [21, 22, 23]]  # two prompts, different lengths (left padding differs)
N = 3                                                # samples per prompt (a GRPO group)


def grouped_batch(pad_id: int):
    """(SequenceBatch of 6 rows, G=2 distinct prompts), responses ragged."""
    g = torch.Generator().manual_seed(0)
    rows_p = [p for p in PROMPTS for _ in range(N)]
    rows_r = [torch.randint(3, 200, (k,), generator=g).tolist() for k in (4, 2, 5, 3, 1, 5)]
    return pack_sequences(rows_p, rows_r, pad_id)


def count_tokens(model: torch.nn.Module) -> tuple[list[int], object]:
    """(list that collects the tokens of each forward, hook handle) at `model`'s input embedding."""
    seen: list[int] = []
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].numel()))
    return seen, handle


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_policy_update_and_logprobs_run_each_distinct_prompt_once(lora):
    learner = Learner(model_cfg(lora=lora), LearnerConfig(micro_batch_size=6, optim={"lr": 1e-3}), kind="policy",
                      init_path="builtin:tiny", backend=resolve_backend("cpu"), total_updates=2, seed=0, num_threads=2)
    assert learner.shares_prompts
    seq = grouped_batch(learner.tokenizer.pad_token_id)
    B, P, T, G = len(seq), seq.prompt_len, seq.response_mask.shape[1], len(PROMPTS)
    # tokens of one forward over the micro-batch: each prompt but its last token once, then every row's last
    # prompt token and its response but the last token (which predicts nothing), packed without their
    # padding (`rlhf_ray.models.packed`)
    _, inverse = distinct_prompts(seq)
    responses = pack_responses(seq, inverse, max_prompt_keys=max(P - 1, T)).input_ids.numel()
    shared, plain = G * (P - 1) + responses, B * (P + T)
    assert responses < B * T and shared < plain
    old = plain_logprobs(learner, seq)
    adv = torch.linspace(-1, 1, B).unsqueeze(1) * seq.response_mask
    batch = TrainBatch(seq, old, old.clone(), adv, adv.clone(), None)
    worker = PolicyWorker(learner, AlgorithmConfig(loss_agg="token-mean", tis=False), ReferenceConfig(kl_coef=0.0), temperature=1.0,
                          norm_len=8)
    seen, handle = count_tokens(learner.model)
    try:
        logp = worker.logprobs(seq)                  # the old log-probs of a step
        assert sum(seen) == shared, seen
        seen.clear()
        ref = worker.ref_logprobs(seq)               # adapter off under LoRA; the policy's own without
        assert sum(seen) == shared, seen
        seen.clear()
        stats = worker.update(batch, [[torch.arange(B)]], kl_coef=0.0)
        assert sum(seen) == shared, seen             # the training forward (its backward runs no embedding)
    finally:
        handle.remove()
    # sharing computes the same function: the log-probs are the plain forward's and the update is a real one
    mask = seq.response_mask.bool()
    assert (logp - old)[mask].abs().max() < 1e-5 and (ref - old)[mask].abs().max() < 1e-5
    assert stats.agreement.max_abs < 1e-5 and stats.stats["policy/grad_norm"] > 1e-4
