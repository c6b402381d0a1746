"""The single-rank `Learner` (no Ray): training, LoRA / QLoRA, weights, reference, checkpoints, export."""
from __future__ import annotations

import pytest
import torch

from rlhf_ray.offline.stages import sft_step_loss
from tests.learner.helpers import make_learner, split, token_batches

pytestmark = pytest.mark.slow


def _train(learner, batches):
    return [learner.train_step(sft_step_loss, split(b))["loss"] for b in batches]


def test_sft_loss_falls_and_stats():
    learner = make_learner()
    losses = _train(learner, token_batches(12))
    assert learner.updates == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    # grad_norm is the unclipped norm of this step's gradient: recompute it on a plain HF copy of the weights
    from transformers import LlamaForCausalLM
    batch = token_batches(1, seed=9)[0]
    plain = LlamaForCausalLM.from_pretrained(learner.init_path)
    plain.load_state_dict(dict(learner.named_weights("full")))
    logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    from rlhf_ray.algo import sft_loss
    sft_loss(logits[:, :-1], batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:])[0].backward()
    expected = torch.stack([p.grad.norm() for p in plain.parameters() if p.grad is not None]).norm()
    stats = learner.train_step(sft_step_loss, split(batch))
    assert stats["grad_norm"] == pytest.approx(float(expected), rel=1e-4)
    assert stats["grad_norm"] > 1.0  # above max_grad_norm: the clipped norm would read 1.0
    assert 0 < stats["lr"] < 3e-3  # linear decay after warm-up


def _assert_merged_export_computes_as_the_learner(learner, folder, ids, tol: float):
    """The merged HF export in `folder`, after checking that its logits on `ids` are the learner's."""
    from transformers import LlamaForCausalLM
    learner.export_hf(folder, merge_lora=True)
    merged = LlamaForCausalLM.from_pretrained(folder)
    learner.ds_engine.eval()
    with torch.no_grad():
        ours = learner.forward_logits(ids["input_ids"], ids["attention_mask"])
        theirs = merged(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, atol=tol, rtol=tol)
    return merged


def test_full_weight_names_match_plain_hf_and_export_loads(tmp_path):
    from transformers import LlamaForCausalLM
    learner = make_learner(lora=True)
    _train(learner, token_batches(3))
    plain = LlamaForCausalLM.from_pretrained(learner.init_path)
    names = [n for n, _ in learner.named_weights("full")]
    assert names == list(plain.state_dict())
    _assert_merged_export_computes_as_the_learner(learner, tmp_path / "merged", token_batches(1)[0], tol=1e-5)


def test_lora_changes_only_adapter_weights_and_reference_is_the_base(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import LlamaForCausalLM
    learner = make_learner(lora=True)
    ids = token_batches(1, seed=5)[0]
    learner.ds_engine.eval()
    with torch.no_grad():
        before = learner.forward_logits(ids["input_ids"], ids["attention_mask"])
    base_before = {k: v.clone() for k, v in learner.model.state_dict().items() if "lora_" not in k}
    adapter_before = dict(learner.named_weights("adapter"))
    _train(learner, token_batches(4))
    base_after = {k: v for k, v in learner.model.state_dict().items() if "lora_" not in k}
    assert base_before.keys() == base_after.keys()
    for k in base_before:
        assert torch.equal(base_before[k], base_after[k]), f"frozen base weight {k} moved"
    adapter_after = dict(learner.named_weights("adapter"))
    assert adapter_after.keys() == get_peft_model_state_dict(learner.model).keys()
    assert any(not torch.equal(adapter_before[k], adapter_after[k]) for k in adapter_after)
    learner.ds_engine.eval()
    with torch.no_grad(), learner.reference_context():
        ref = learner.forward_logits(ids["input_ids"], ids["attention_mask"])
    torch.testing.assert_close(ref, before)  # adapters off = the initial model
    assert learner.adapter_config()["r"] == 4
    learner.export_hf(tmp_path / "adapter", merge_lora=False)
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(learner.init_path), tmp_path / "adapter")
    with torch.no_grad():
        ours = learner.forward_logits(ids["input_ids"], ids["attention_mask"])
        theirs = loaded(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_qlora_changes_only_adapter_weights_and_reference_is_the_4bit_base():
    """QLoRA's reference is the same learner with its adapter off: the frozen NF4 base, as it was before
    training (no second copy), while the trained policy has moved away from it."""
    learner = make_learner(qlora=True, lr=1e-2)
    assert any(type(m).__name__ == "Linear4bit" for m in learner.model.modules())
    ids = token_batches(1, seed=5)[0]
    learner.ds_engine.eval()
    with torch.no_grad():
        before = learner.forward_logits(ids["input_ids"], ids["attention_mask"])
    base_before = {k: v.clone() for k, v in learner.model.state_dict().items() if "lora_" not in k}
    _train(learner, token_batches(4))
    base_after = {k: v for k, v in learner.model.state_dict().items() if "lora_" not in k}
    assert base_before.keys() == base_after.keys()
    for k in base_before:
        assert torch.equal(base_before[k], base_after[k]), f"frozen 4-bit base weight {k} moved"
    learner.ds_engine.eval()
    with torch.no_grad():
        policy = learner.forward_logits(ids["input_ids"], ids["attention_mask"])
        with learner.reference_context():
            ref = learner.forward_logits(ids["input_ids"], ids["attention_mask"])
    assert (policy - before).abs().max() > 1e-2  # the adapter trained: the policy is not the base
    torch.testing.assert_close(ref, before)       # adapter off = the initial (quantized) model


def test_qlora_trains_and_merged_export_matches_adapter_model(tmp_path):
    learner = make_learner(qlora=True, lr=1e-2)
    assert any(type(m).__name__ == "Linear4bit" for m in learner.model.modules())
    losses = _train(learner, token_batches(8))
    assert losses[-1] < losses[0], losses
    merged = _assert_merged_export_computes_as_the_learner(learner, tmp_path / "merged", token_batches(1, seed=3)[0],
                                                           tol=1e-4)
    assert all(p.dtype == torch.float32 for p in merged.parameters())


def test_resume_continues_with_the_same_losses(tmp_path):
    batches = token_batches(6, seed=1)
    straight = _train(make_learner(lora=True), batches)
    first = make_learner(lora=True)
    part1 = _train(first, batches[:3])
    first.save_checkpoint(tmp_path / "ckpt", {"step": 3})
    del first
    second = make_learner(lora=True)  # fresh weights, fresh optimizer: all state must come from disk
    assert second.load_checkpoint(tmp_path / "ckpt") == {"step": 3}
    assert second.updates == 3
    part2 = _train(second, batches[3:])
    assert part1 + part2 == pytest.approx(straight, rel=1e-6, abs=1e-7)


def test_reward_scores_pool_at_last_attended_token():
    learner = make_learner(kind="reward", init="builtin:tiny-rm")
    learner.ds_engine.eval()
    ids = torch.randint(3, 400, (2, 10))
    full = torch.ones_like(ids)
    with torch.no_grad():
        short = learner.forward_scores(ids[:, :6], full[:, :6])
        padded_ids = ids.clone()
        padded_ids[:, 6:] = learner.tokenizer.pad_token_id
        mask = full.clone()
        mask[:, 6:] = 0
        padded = learner.forward_scores(padded_ids, mask)
    assert short.shape == (2,)
    torch.testing.assert_close(padded, short, atol=1e-5, rtol=1e-5)


def test_value_model_gives_a_value_per_token():
    from transformers import LlamaForCausalLM
    learner = make_learner(kind="value")
    b = token_batches(1)[0]
    learner.ds_engine.eval()
    with torch.no_grad():
        values = learner.forward_values(b["input_ids"], b["attention_mask"])
        assert values.shape == b["input_ids"].shape
        # the critic is the policy's causal backbone (same weights) with a fresh scalar head
        policy = LlamaForCausalLM.from_pretrained(learner.init_path).model.state_dict()
        critic = learner.hf_model.model.state_dict()
        assert policy.keys() == critic.keys() and all(torch.equal(policy[k], critic[k]) for k in policy)
        hidden = learner.hf_model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        torch.testing.assert_close(values, learner.hf_model.score(hidden).squeeze(-1), rtol=1e-5, atol=1e-6)
        # V(s_t) sees only tokens up to t: changing the last token moves only the last value
        ids = b["input_ids"].clone()
        ids[:, -1] = ids[:, -1] + 7
        moved = learner.forward_values(ids, b["attention_mask"])
    torch.testing.assert_close(moved[:, :-1], values[:, :-1], rtol=1e-5, atol=1e-6)
    assert (moved[:, -1] - values[:, -1]).abs().min() > 1e-6


def test_reward_lora_exports_adapter_and_merged_model_that_score_alike(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    from rlhf_ray.offline.stages import rm_step_loss
    learner = make_learner(kind="reward", lora=True, init="builtin:tiny-rm")
    b = token_batches(2, rows=8)
    pairs = {"chosen_ids": b[0]["input_ids"], "chosen_mask": b[0]["attention_mask"],
             "rejected_ids": b[1]["input_ids"], "rejected_mask": b[1]["attention_mask"]}
    learner.train_step(rm_step_loss, [pairs])
    assert any(n.endswith("score.weight") for n, _ in learner.named_weights("adapter"))  # the head trains too
    learner.export_hf(tmp_path / "adapter", merge_lora=False)
    learner.export_hf(tmp_path / "merged", merge_lora=True)
    base = AutoModelForSequenceClassification.from_pretrained(learner.init_path, num_labels=1)
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "adapter")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    learner.ds_engine.eval()
    with torch.no_grad():
        ours = learner.forward_scores(b[0]["input_ids"], b[0]["attention_mask"])
        for model in (with_adapter, merged):
            torch.testing.assert_close(model(input_ids=b[0]["input_ids"]).logits.squeeze(-1), ours,
                                       atol=1e-5, rtol=1e-5)


def test_gradient_accumulation_equals_one_big_micro_batch():
    batch = token_batches(1, rows=8, seed=4)[0]
    whole, parts = make_learner(), make_learner()
    one = whole.train_step(sft_step_loss, [batch])
    two = parts.train_step(sft_step_loss, split(batch, 4))  # 2 micro-batches, one optimizer step
    # Every row has the same number of supervised tokens, so the row-weighted mean equals the token mean.
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-6)
    # Adam's first step is about lr * sign(g) = 1.5e-3 here; float-rounding differences in near-zero
    # gradient entries move a few weights by up to ~3e-6, so 1e-5 is under 1% of one update.
    for (name, a), (_, b) in zip(whole.named_weights("full"), parts.named_weights("full")):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=name)
