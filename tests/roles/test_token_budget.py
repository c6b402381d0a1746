"""Token-budget micro-batches: whole prompt groups, the same count on every rank, and the same update and scores
as row-count micro-batches up to float rounding (a tiny random Llama behind a plain-torch stand-in for the
DeepSpeed learner: the real `PolicyWorker` and `CriticWorker` code runs; `Learner.train_step`'s accumulation
rule, n / total rows per micro-batch, is copied here and its equality with DeepSpeed's is the slow tier's
`roles/test_micro_weights.py`)."""
from types import SimpleNamespace

import pytest
import torch

from rlhf_ray.batch import pack_sequences
from rlhf_ray.config import load_config
from rlhf_ray.config.schema import LearnerConfig
from rlhf_ray.dispatch import (minibatch_micro_batches, pack_by_tokens, prompt_runs, row_lengths,
                               token_budget_micro_batches)
from rlhf_ray.models.packed import mask_dtype
from rlhf_ray.records import TrainBatch
from rlhf_ray.roles.critic import CriticWorker
from rlhf_ray.roles.policy import PolicyWorker

N = 4  # samples per prompt
# per prompt: its length, and its samples' response lengths (mixed: 1 to 23 tokens)
PROMPTS = [(3, [2, 23, 5, 1]), (6, [4, 4, 3, 2]), (2, [17, 20, 9, 12]), (5, [1, 1, 2, 1])]


def _seq(pad=0):
    g = torch.Generator().manual_seed(0)
    prompts, responses = [], []
    for plen, lens in PROMPTS:
        p = torch.randint(3, 60, (plen,), generator=g).tolist()
        for n in lens:
            prompts.append(p)
            responses.append(torch.randint(3, 60, (n,), generator=g).tolist())
    return pack_sequences(prompts, responses, pad)


def test_runs_are_the_prompt_groups_and_packing_respects_the_budget():
    seq = _seq()
    runs = prompt_runs(seq, torch.arange(len(seq)))
    assert [r.tolist() for r in runs] == [list(range(i, i + N)) for i in range(0, 16, N)]
    p, t = row_lengths(seq)
    assert p.tolist()[::N] == [3, 6, 2, 5] and t.tolist()[:4] == [2, 23, 5, 1]
    parts = pack_by_tokens(runs, p, t, budget=120)
    # longest first: group 0 (3 + 23 = 26 wide, 104 tokens) alone; group 2 (2 + 20) 88 alone; groups 1 and 3
    # together: 8 rows x (6 + 4) = 80
    assert [sorted(x.tolist()) for x in parts] == [list(range(0, 4)), list(range(8, 12)),
                                                  list(range(4, 8)) + list(range(12, 16))]
    assert sorted(torch.cat(parts).tolist()) == list(range(16))
    # a group wider than the budget is never split: it runs alone
    assert [len(x) for x in pack_by_tokens(runs, p, t, budget=10)] == [4, 4, 4, 4]


def test_every_rank_runs_as_many_micro_batches_over_its_own_equal_share():
    seq = _seq()
    rows = torch.tensor([8, 9, 10, 11, 0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7])  # a shuffle of whole groups
    plans = [token_budget_micro_batches(rows, seq, 120, rank, 2) for rank in range(2)]
    assert len(plans[0]) == len(plans[1])
    for rank, plan in enumerate(plans):
        assert sorted(torch.cat([m["idx"] for m in plan]).tolist()) == sorted(rows[rank * 8:(rank + 1) * 8].tolist())
        for m in plan:  # every micro-batch carries the whole minibatch's rows and tokens
            assert m["totals"][0].tolist() == [16, float(seq.response_mask.sum())]


def test_trimming_drops_only_columns_that_are_padding_in_every_row():
    seq = _seq()
    sub = seq.select(torch.tensor([12, 13, 14, 15])).trimmed()  # prompt 5 tokens, responses 1, 1, 2, 1
    assert sub.prompt_len == 5 and sub.response_mask.shape[1] == 2
    assert sub.attention_mask.sum() == 4 * 5 + 5
    full = seq.select(torch.tensor([12, 13, 14, 15]))
    assert torch.equal(sub.response_ids, full.response_ids[:, :2])
    assert torch.equal(sub.position_ids[sub.attention_mask.bool()], full.position_ids[full.attention_mask.bool()])


@pytest.fixture(autouse=True)
def _one_thread():
    """A model this small gains nothing from a second thread, and on a loaded 2-core machine OpenMP's spinning
    made one backward take 1.5 s instead of 0.1 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _TinyLearner:
    """What `PolicyWorker` / `CriticWorker` use of a `Learner`, over a plain torch model; `train_step`
    accumulates gradients with the learner's own rule and leaves them in place (no optimizer step)."""

    def __init__(self, cfg: LearnerConfig, kind: str = "policy"):
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             attn_implementation="eager")
        self.model = LlamaForCausalLM(config).float()
        if kind == "value":
            self.model.lm_head = torch.nn.Linear(32, 1, bias=False)
        self.cfg, self.ds_engine, self.shares_prompts = cfg, self.model, True
        self.packed_mask_dtype = mask_dtype(self.model)  # rows packed without padding, as a Learner packs them
        self.micro_batch_count = 0

    def forward(self, **kw):
        return self.model(**kw)

    def forward_values(self, input_ids, attention_mask, position_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[..., 0]

    def train_step(self, loss_fn, micro_batches):
        self.model.zero_grad()
        rows = [len(mb["idx"]) for mb in micro_batches]
        total, sums = sum(rows), {}
        for mb, n in zip(micro_batches, rows):
            loss, stats = loss_fn(self, mb)
            (loss * (n / total)).backward()
            for k, v in {"loss": float(loss.detach()), **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n / total
        self.micro_batch_count += len(micro_batches)
        return sums


def _train_batch(seq):
    g = torch.Generator().manual_seed(1)
    mask = seq.response_mask
    old = -torch.rand(mask.shape, generator=g) * 3 * mask
    adv = torch.randn(len(seq), 1, generator=g) * mask
    return TrainBatch(seq, old, old.clone(), adv, adv.clone(), torch.randn(mask.shape, generator=g) * mask)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", ["grpo", "gspo", "cispo"])
def test_token_budget_updates_and_scores_as_row_micro_batches_do(name):
    seq = _seq()
    batch = _train_batch(seq)
    rows = [[torch.tensor([8, 9, 10, 11, 0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7])]]
    cfg = load_config(None, [f"algorithm.name={name}", "reference.kl_coef=0", "algorithm.clip_low=0.2",
                             "algorithm.clip_high=0.2"])
    out = {}
    for key, lc in (("rows", LearnerConfig(micro_batch_size=4)),
                    ("tokens", LearnerConfig(micro_batch_size=4, max_tokens_per_micro_batch=120))):
        learner = _TinyLearner(lc)
        worker = PolicyWorker(learner, cfg.algorithm, cfg.reference, temperature=1.0, norm_len=24)
        result = worker.update(batch, rows, kl_coef=0.0)
        out[key] = (result, _grads(learner.model), worker.logprobs(seq), learner.micro_batch_count)
    (r_rows, g_rows, lp_rows, n_rows), (r_tok, g_tok, lp_tok, n_tok) = out["rows"], out["tokens"]
    assert (n_rows, n_tok) == (4, 3)  # 4 groups of 4 rows; by tokens: 2 long groups alone, 2 short together
    assert torch.allclose(g_tok, g_rows, rtol=1e-5, atol=1e-7) and float(g_rows.abs().sum()) > 1e-3
    assert r_tok.stats["policy/objective"] == pytest.approx(r_rows.stats["policy/objective"], rel=1e-5, abs=1e-7)
    assert torch.allclose(lp_tok, lp_rows, atol=1e-5) and lp_rows.shape == seq.response_mask.shape
    assert bool((lp_rows[seq.response_mask == 0] == 0).all())
    assert r_tok.agreement.num_tokens == r_rows.agreement.num_tokens == int(seq.response_mask.sum())


def test_the_critics_token_budget_values_and_update_match_row_micro_batches():
    seq = _seq()
    batch = _train_batch(seq)
    rows = [[torch.arange(16)]]
    cfg = load_config(None, ["algorithm.name=ppo"])
    out = {}
    for key, lc in (("rows", LearnerConfig(micro_batch_size=4)),
                    ("tokens", LearnerConfig(micro_batch_size=4, max_tokens_per_micro_batch=120))):
        learner = _TinyLearner(lc, kind="value")
        worker = CriticWorker(learner, cfg.algorithm, norm_len=24)
        result = worker.update(batch, rows)
        out[key] = (result, _grads(learner.model), worker.values(seq))
    assert torch.allclose(out["tokens"][1], out["rows"][1], rtol=1e-5, atol=1e-7)
    assert torch.allclose(out["tokens"][2], out["rows"][2], atol=1e-5)
    # the objective as trained (each micro-batch's token-mean reweighted to its share of the minibatch's tokens);
    # the per-micro-batch statistics such as value/loss are averaged by rows in both modes, not reweighted
    assert out["tokens"][0].stats["value/objective"] == pytest.approx(out["rows"][0].stats["value/objective"],
                                                                      rel=1e-5)


def test_token_budget_micro_batches_are_refused_where_they_are_not_supported():
    from rlhf_ray.config import ConfigError
    with pytest.raises(ConfigError, match="sft.learner.max_tokens_per_micro_batch applies to the RL learners"):
        load_config(None, ["sft.learner.max_tokens_per_micro_batch=512"])
    with pytest.raises(ConfigError, match="zero_stage=3 on 2 ranks"):
        load_config(None, ["rl.policy.max_tokens_per_micro_batch=512", "rl.policy.deepspeed.zero_stage=3",
                           "rl.policy.num_ranks=2"])
    assert load_config(None, ["rl.policy.max_tokens_per_micro_batch=512"]).rl.policy.max_tokens_per_micro_batch == 512
    # a row-count minibatch is unchanged: the old path still cuts `size` rows in order
    seq = _seq()
    assert [m["idx"].tolist() for m in minibatch_micro_batches(torch.arange(8), 4, seq.response_mask)] == [
        [0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_reward_models_token_budget_scores_every_row_where_it_belongs():
    from rlhf_ray.roles.reward import ModelSource
    lengths = [3, 30, 4, 28, 2, 5, 31, 3]
    shapes = []

    def scores(ids, mask):  # a score that depends on the row alone, not on its padding or batch
        shapes.append(tuple(ids.shape))
        return (ids * mask).sum(-1).float() / mask.sum(-1)

    def make(max_tokens):
        src = ModelSource.__new__(ModelSource)
        src.tok = SimpleNamespace(pad_token_id=0)
        src.batch_size, src.device, src.max_tokens = 4, "cpu", max_tokens
        src._encode = lambda p, r, finished: [int(p)] * int(r)
        src._scores = scores
        return src

    prompts, responses = [str(i + 1) for i in range(8)], [str(n) for n in lengths]
    by_rows = make(None)(prompts, responses)
    rows_shapes, shapes[:] = list(shapes), []
    by_tokens = make(64)(prompts, responses)
    assert by_tokens == by_rows == [float(i + 1) for i in range(8)]
    assert rows_shapes == [(4, 30), (4, 31)]
    assert all(b * w <= 64 for b, w in shapes) and sum(b for b, _ in shapes) == 8
    assert sum(b * w for b, w in shapes) < sum(b * w for b, w in rows_shapes)


def test_an_algorithm_section_built_alone_leaves_auto_uncorrected():
    """`is_correction: auto` is resolved with the whole config; a section built alone (tests, tools) corrects
    nothing, as `tis: auto` did (it once reached the IS weights as an unknown preset)."""
    from rlhf_ray.config.schema import AlgorithmConfig, ReferenceConfig
    seq = _seq()
    worker = PolicyWorker(_TinyLearner(LearnerConfig(micro_batch_size=8)), AlgorithmConfig(loss_agg="token-mean"),
                          ReferenceConfig(kl_coef=0.0), temperature=1.0, norm_len=24)
    stats = worker.update(_train_batch(seq), [[torch.arange(8)], [torch.arange(8, 16)]], kl_coef=0.0).stats
    assert not any(k.startswith("is/") for k in stats)
