"""A plain HF model (+ peft) as the stand-in learner, and HF references for generator tests."""
import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="session")
def tiny_path():
    from rlhf_ray.models.kit import resolve_model_path
    return resolve_model_path("builtin:tiny")


def load_hf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def named_weights(model, mode="full"):
    """What the learner's `named_weights(mode)` yields: HF state-dict names, or peft adapter names."""
    if mode == "full":
        for name, tensor in model.state_dict().items():
            yield name, tensor.detach()
    else:
        from peft import get_peft_model_state_dict
        yield from get_peft_model_state_dict(model).items()


def adapter_config(peft_model) -> dict:
    return peft_model.peft_config["default"].to_dict()


@torch.no_grad()
def perturb(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad or not hasattr(model, "peft_config"):
            p.add_(torch.randn(p.shape, generator=g) * scale)


@torch.no_grad()
def cut_at_eos(seq, eos=2):
    """A greedy HF continuation as the engine returns it: up to and with the first EOS (the tiny models' 2)."""
    return seq[:seq.index(eos) + 1] if eos in seq else seq


def hf_greedy(model, prompts, max_new_tokens):
    out = []
    for p in prompts:
        ids = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


@torch.no_grad()
def hf_logprobs(model, rollout, pad_id=0):
    """Both sides of the agreement check, each (B, T): the learner's recomputation log softmax(logits / T)
    of the sampled tokens, the engine's own log-probs (0 in padding), and the response mask."""
    from rlhf_ray.batch import pack_sequences, pad_ragged

    for b, (resp, logp) in enumerate(zip(rollout.response_ids, rollout.response_logprobs)):
        assert len(logp) == len(resp), f"sample {b}: {len(resp)} response tokens but {len(logp)} log-probs"
    seq = pack_sequences(rollout.prompt_ids, rollout.response_ids, pad_id)
    logits = model(input_ids=seq.input_ids, attention_mask=seq.attention_mask,
                   position_ids=seq.position_ids).logits[:, seq.prompt_len - 1:-1]
    logp = torch.log_softmax(logits.float() / rollout.temperature, -1)
    engine_logp = pad_ragged(rollout.response_logprobs, seq.response_mask.shape[1])
    return logp.gather(-1, seq.response_ids.unsqueeze(-1)).squeeze(-1), engine_logp, seq.response_mask


@pytest.fixture(scope="session")
def standin_learner_cls():
    """A Ray actor exposing the learner contract: named_weights(mode), adapter_config()."""
    import sys

    from ray import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import tests/ modules

    class StandInLearner:
        def __init__(self, path, seed):
            self.model = load_hf(path)
            perturb(self.model, seed)

        def named_weights(self, mode, frozen=True):
            return named_weights(self.model, mode)

        def adapter_config(self):
            return None

        def updates(self):   # optimizer steps: none, the weights stay those it was built with
            return 0

    return StandInLearner



def submit_as_the_roles_do(group, prompts, **kwargs):
    """`group.submit(...).result()` with the one retry `rl.distributed.DistributedRoles.generate` makes: an
    engine killed just before the call may still take it (a kill is asynchronous) and raise from `.result()`;
    the retry finds it restarted and re-synced."""
    import ray
    try:
        return group.submit(prompts, **kwargs).result()
    except ray.exceptions.RayActorError:
        return group.submit(prompts, **kwargs).result()
