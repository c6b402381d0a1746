"""Rows packed without their padding: the same logits, values and gradients as the padded forward."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

from rlhf_ray.batch import pack_sequences
from rlhf_ray.models.packed import MIN_SAVING, first_fit, mask_dtype, pack_responses, pack_rows
from rlhf_ray.models.shared_prompt import distinct_prompts, response_logits_of


def config(attn: str) -> LlamaConfig:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    cfg._attn_implementation = attn
    return cfg


def lm(attn: str = "sdpa", dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(config(attn)).to(dtype)


def ragged_batch(rows: int = 9):
    """One sample per prompt (PPO): prompts of 2-6 tokens, responses of 1-12, one at the cap."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 64, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
               for _ in range(rows)]
    responses = [torch.randint(1, 64, (int(torch.randint(1, 13, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(rows)]
    responses[0] = list(range(1, 13))
    return pack_sequences(prompts, responses, pad_id=0)


def call(m):
    return lambda **kw: m(**kw)


def assert_packed_equals_padded(seq, attn: str, share: bool) -> torch.Tensor:
    """The plain padded forward's response logits and gradients against the packed one's (`share`: the
    shared-prompt path, its response pass packed); returns the plain logits."""
    out = []
    for pack in (False, True):
        m = lm(attn)
        logits = response_logits_of(call(m), seq, share_prompts=share and pack,
                                    pack_dtype=mask_dtype(m) if pack else None)
        (logits.log_softmax(-1).amax(-1) * seq.response_mask).sum().backward()
        out.append((logits.detach(), torch.cat([p.grad.flatten() for p in m.parameters()])))
    (plain, g_plain), (packed, g_packed) = out
    mask = seq.response_mask.bool()
    assert packed.shape == plain.shape
    assert (packed - plain)[mask].abs().max() < 1e-5
    assert (g_packed - g_plain).abs().max() < 1e-5 * max(1.0, float(g_plain.abs().max()))
    return plain


def test_every_real_token_lands_once_at_its_own_position():
    seq = ragged_batch()
    packed = pack_rows(seq)
    real = seq.attention_mask.bool()
    R, W = packed.shape
    assert R < len(seq) and W == int(real.sum(1).max())
    where = packed.where[real]
    assert len(set(where.tolist())) == int(real.sum())  # no two tokens share a slot
    assert torch.equal(packed.input_ids.flatten()[where], seq.input_ids[real])
    assert torch.equal(packed.position_ids.flatten()[where], seq.position_ids[real])
    assert torch.equal(packed.segment.flatten()[where], torch.arange(len(seq))[:, None].expand_as(real)[real])
    assert int((packed.segment >= 0).sum()) == int(real.sum())
    assert (packed.where[~real] == -1).all()


def test_nothing_is_packed_where_nothing_is_saved():
    same = pack_sequences([[5, 6]] * 4, [[1, 2, 3]] * 4, pad_id=0)
    assert pack_rows(same) is None  # every row is as wide as the widest
    # 9 rows of which two short ones share a row: 8 rows of 10 instead of 9 saves 11%, under MIN_SAVING (1/8)
    almost = pack_sequences([[5, 6]] * 9, [[1] * 8] * 7 + [[1, 2, 3]] * 2, pad_id=0)
    assert MIN_SAVING == 1 / 8 and pack_rows(almost) is None
    assert pack_rows(pack_sequences([[5, 6]] * 8, [[1] * 8] * 6 + [[1, 2, 3]] * 2, pad_id=0)).shape == (7, 10)
    groups = pack_sequences([[5, 6, 7]] * 3, [[1, 2, 3, 4]] * 3, pad_id=0)
    _, inverse = distinct_prompts(groups)
    assert pack_responses(groups, inverse, max_prompt_keys=8) is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_response_logits_and_gradients_equal_the_padded(attn):
    seq = ragged_batch()
    mask = seq.response_mask.bool()
    plain = assert_packed_equals_padded(seq, attn, share=False)
    # a packed mask that let sequences see each other would move the logits
    m = lm(attn)
    rows = pack_rows(seq)
    leaky = rows.model_inputs(mask_dtype(m))
    leaky["attention_mask"] = None  # plain causal attention across the whole packed row
    with torch.no_grad():
        moved = rows.unpack(m(**leaky).logits, slice(seq.prompt_len - 1, seq.prompt_len - 1 + mask.shape[1]))
    assert (moved - plain)[mask].abs().max() > 1e-3


def test_packed_bf16_eager_logits_agree_to_bf16_rounding():
    seq = ragged_batch()
    mask = seq.response_mask.bool()
    m = lm("eager", torch.bfloat16)
    with torch.no_grad():
        plain = response_logits_of(call(m), seq, share_prompts=False).float()
        packed = response_logits_of(call(m), seq, share_prompts=False, pack_dtype=mask_dtype(m)).float()
    assert (packed - plain)[mask].abs().max() < 0.05 * max(1.0, float(plain[mask].abs().max()))


def test_packed_values_equal_the_padded():
    seq = ragged_batch()
    torch.manual_seed(0)
    cfg = config("sdpa")
    cfg.num_labels = 1
    critic = LlamaForTokenClassification(cfg).eval()  # no dropout before the head
    rows = pack_rows(seq)
    with torch.no_grad():
        plain = critic(input_ids=seq.input_ids, attention_mask=seq.attention_mask,
                       position_ids=seq.position_ids).logits.squeeze(-1)
        packed = rows.unpack(critic(**rows.model_inputs(mask_dtype(critic))).logits.squeeze(-1))
    real = seq.attention_mask.bool()
    assert packed.shape == plain.shape
    assert (packed - plain)[real].abs().max() < 1e-5


def test_attention_without_a_4d_mask_keeps_the_padded_forward():
    m = lm()
    m.config._attn_implementation = "flash_attention_2"
    assert mask_dtype(m) is None
    assert mask_dtype(lm("sdpa")) == torch.bool and mask_dtype(lm("eager")) == torch.float32
    assert mask_dtype(lm("eager", torch.bfloat16)) == torch.bfloat16  # eager adds it: the model's own dtype, as HF's


def grouped_ragged_batch(n: int = 4):
    """Three prompts of 2-5 tokens, n samples each, responses of 1-16 tokens (GRPO's layout, ragged)."""
    g = torch.Generator().manual_seed(5)
    rows_p, rows_r = [], []
    for prompt in ([5, 6, 7, 8, 9], [10, 11], [12, 13, 14]):
        for _ in range(n):
            rows_p.append(prompt)
            rows_r.append(torch.randint(1, 64, (int(torch.randint(1, 17, (1,), generator=g)),), generator=g).tolist())
    rows_r[0] = list(range(1, 17))
    return pack_sequences(rows_p, rows_r, pad_id=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_shared_prompt_responses_equal_the_plain_forward(attn):
    """The response pass packed (each packed row seeing its own prompts' cached keys) against the plain padded
    forward: the same logits, and the same gradients through the gathered cache into the prompt pass."""
    seq = grouped_ragged_batch()
    mask = seq.response_mask.bool()
    _, inverse = distinct_prompts(seq)
    R, _ = pack_responses(seq, inverse, max_prompt_keys=16).shape
    assert R < len(seq)
    assert_packed_equals_padded(seq, attn, share=True)


def test_a_packed_row_holds_several_prompts_and_each_sees_only_its_own():
    seq = grouped_ragged_batch()
    _, inverse = distinct_prompts(seq)
    rows = pack_responses(seq, inverse, max_prompt_keys=16)   # up to 4 prompts (of 4 keys) a row
    assert rows.slots.shape[1] > 1
    several = [r for r in range(rows.shape[0]) if len(set(rows.slots[r].tolist())) > 1
               and rows.slot_sees[r].any(0).sum() > 1]
    assert several  # some packed row serves sequences of two prompts
    assert (rows.slot_sees.sum(-1)[rows.segment >= 0] == 1).all()  # each token sees exactly one prompt slot
    one = pack_responses(seq, inverse, max_prompt_keys=4)     # one prompt a row
    assert one is None or all(len(set(s.tolist())) == 1 for s in one.slots)


def test_first_fit_keeps_to_the_width_and_the_prompt_limit():
    lengths, prompt = [5, 4, 3, 3, 2, 1, 1], [0, 1, 0, 2, 1, 2, 0]
    place, prompts = first_fit(lengths, 5, prompt, max_prompts=2)
    used = {}
    for i, (r, c) in enumerate(place):
        assert c + lengths[i] <= 5
        used.setdefault(r, []).extend(range(c, c + lengths[i]))
        assert prompt[i] in prompts[r]
    assert all(len(cols) == len(set(cols)) for cols in used.values())  # no two sequences overlap
    assert all(len(p) <= 2 for p in prompts)
