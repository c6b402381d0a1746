"""Each distinct prompt computed once: the same logits and gradients as the plain forward."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_ray.batch import pack_sequences
from rlhf_ray.models.shared_prompt import distinct_prompts, response_logits_of


def model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).float()


def grouped_batch(n: int = 3):
    """Three prompts of different lengths (left padding differs), each sampled n times, responses ragged."""
    g = torch.Generator().manual_seed(1)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    rows_p, rows_r = [], []
    for p in prompts:
        for _ in range(n):
            rows_p.append(p)
            rows_r.append(torch.randint(1, 64, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist())
    return pack_sequences(rows_p, rows_r, pad_id=0)


def call(m):
    return lambda **kw: m(**kw)


def test_distinct_prompts_maps_every_row_to_its_prompt():
    seq = grouped_batch(n=3)
    first, inverse = distinct_prompts(seq)
    assert len(first) == 3
    p = seq.prompt_len
    assert torch.equal(seq.input_ids[first[inverse], :p], seq.input_ids[:, :p])
    assert sorted(inverse.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    one_each = pack_sequences([[5, 6], [7, 8]], [[1], [2]], pad_id=0)
    assert distinct_prompts(one_each) is None


def test_shared_prompt_logits_equal_the_plain_forward():
    m, seq = model().eval(), grouped_batch()
    with torch.no_grad():
        plain = response_logits_of(call(m), seq, share_prompts=False)
        shared = response_logits_of(call(m), seq)
    mask = seq.response_mask.bool()
    assert shared.shape == plain.shape
    assert (shared - plain)[mask].abs().max() < 1e-5
    # a wrong position (the response restarted at 0) moves the logits far beyond that
    wrong = pack_sequences([[5, 6, 7, 8, 9]] * 2, [[1, 2, 3]] * 2, pad_id=0)
    with torch.no_grad():
        ok = response_logits_of(call(m), wrong)
        bad = m(input_ids=wrong.input_ids[:, 5:], attention_mask=torch.ones(2, 3, dtype=torch.long)).logits
    assert (ok[:, 1:] - bad[:, :-1]).abs().max() > 1e-2


def test_shared_prompt_gradients_equal_the_plain_backward():
    seq = grouped_batch()
    grads = []
    for share in (False, True):
        m = model().train()
        logits = response_logits_of(call(m), seq, share_prompts=share)
        logp = torch.log_softmax(logits, -1).gather(-1, seq.response_ids.unsqueeze(-1)).squeeze(-1)
        (-(logp * seq.response_mask).sum()).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4), k
    # the prompt's own layers get gradient through the gathered cache (q/k/v of layer 0 included)
    assert grads[1]["model.layers.0.self_attn.k_proj.weight"].abs().sum() > 0


def test_shared_prompt_under_lora_trains_the_adapter_alike():
    peft = pytest.importorskip("peft")
    seq = grouped_batch()
    grads = []
    for share in (False, True):
        torch.manual_seed(3)
        m = peft.get_peft_model(model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
        logits = response_logits_of(call(m), seq, share_prompts=share)
        logits.logsumexp(-1).mul(seq.response_mask).sum().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad})
        with m.disable_adapter(), torch.no_grad():  # the reference: adapter off, same sharing
            ref = response_logits_of(call(m), seq, share_prompts=share)
        grads[-1]["ref"] = ref
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4), k


def test_gradient_checkpointing_in_training_mode_runs_the_plain_forward():
    from rlhf_ray.models.shared_prompt import can_share
    seq = grouped_batch()
    m = model().train()
    assert can_share(m)
    m.gradient_checkpointing_enable()
    assert not can_share(m) and can_share(m.eval())  # no recompute (and a kept cache) in eval mode
    m.train()
    with pytest.raises(AttributeError):  # the checkpointed layers dropped the cache: sharing cannot run
        response_logits_of(call(m), seq, share_prompts=True)
    logits = response_logits_of(call(m), seq, share_prompts=can_share(m))
    reference = model().train()
    expected = response_logits_of(call(reference), seq, share_prompts=False)
    assert (logits - expected)[seq.response_mask.bool()].abs().max() < 1e-5
