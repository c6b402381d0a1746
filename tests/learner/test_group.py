"""`LearnerGroup` on a real local Ray: 2 ranks with ZeRO-2 and ZeRO-3 train to identical parameters."""
from __future__ import annotations

import pytest
import ray
import torch

from rlhf_ray.learner.group import LearnerGroup
from rlhf_ray.offline.stages import sft_step_loss
from rlhf_ray.utils.device import resolve_backend
from tests.learner.group_calls import TrainingRank, adapter_config, forward, local_weights, named_weights, train_step
from tests.learner.helpers import learner_cfg, model_cfg, token_batches

pytestmark = pytest.mark.slow


def _train_group(zero: int, lora: bool = False) -> tuple[LearnerGroup, list[float]]:
    group = LearnerGroup(model_cfg(lora=lora), learner_cfg(zero, num_ranks=2), kind="policy",
                         init_path="builtin:tiny", total_updates=10, backend=resolve_backend("cpu"), num_threads=1,
                         rank_cls=TrainingRank)
    losses = [train_step(group, sft_step_loss, b)["loss"] for b in token_batches(4, rows=8)]
    return group, losses


def test_zero2_and_zero3_ranks_end_identical_and_agree(ray_local):
    finals = {}
    for zero in (2, 3):
        group, losses = _train_group(zero)
        try:
            assert losses[-1] < losses[0], losses
            r0, r1 = local_weights(group, "full")
            assert r0.keys() == r1.keys()
            for k in r0:
                assert torch.equal(r0[k], r1[k]), f"ZeRO-{zero}: rank 0 and rank 1 differ on {k}"
            finals[zero] = r0
            batch = token_batches(1, rows=4, seed=7)[0]
            logits = forward(group, "logits", {k: batch[k] for k in ("input_ids", "attention_mask")})
            assert logits.shape[:2] == batch["input_ids"].shape
        finally:
            group.shutdown()
    for k in finals[2]:  # same data, same math: the two partitionings agree up to float rounding
        assert_agree_up_to_rounding(finals[3][k], finals[2][k], k)


PEAK_LR, STEPS = 3e-3, 4  # learner_cfg's peak learning rate; _train_group's four updates


def assert_agree_up_to_rounding(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """ZeRO-2 and ZeRO-3 sum the same gradients in another order, so they differ in the last bits, and the
    CPU kind decides which bits (an Intel AMX machine's GEMMs accumulate differently from an AMD EPYC's: one
    element in 65,536 differed by 1.9e-5 there, none over 1e-5 here). Adam turns a gradient that is rounding
    noise into a step of up to lr whose sign the noise picks, so what the product guarantees is: every element
    within twice the learning rates summed over the steps, and all but a few in a thousand within float rounding. A broken
    partitioning (a shard's gradient not averaged, a rank on other data) moves most elements by about lr."""
    diff = (a.float() - b.float()).abs()
    assert diff.max() <= 2 * PEAK_LR * STEPS, f"{name}: max difference {diff.max():.3g}"
    off = (diff > 1e-5 + 1e-4 * b.float().abs()).float().mean().item()
    assert off <= 1e-3, f"{name}: {off:.2%} of elements differ beyond float rounding (max {diff.max():.3g})"


def test_lora_zero3_weights_export_and_resume(ray_local, tmp_path):
    from transformers import LlamaForCausalLM
    group, _ = _train_group(3, lora=True)
    try:
        adapter = named_weights(group, "adapter")
        assert adapter and all(".lora_" in n for n, _ in adapter)
        full = dict(named_weights(group, "full"))
        assert "lm_head.weight" in full and not any("lora" in n for n in full)
        assert adapter_config(group)["r"] == 4
        group.export_hf(str(tmp_path / "merged"), merge_lora=True)
        exported = LlamaForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
        for k, v in full.items():
            assert torch.equal(exported[k], v), k
        # Resume under ZeRO-3 with partitioned optimizer state: the same batches give the same losses.
        group.save_checkpoint(str(tmp_path / "ckpt"), {"step": 4})
        later = token_batches(2, rows=8, seed=11)
        first = [train_step(group, sft_step_loss, b)["loss"] for b in later]
        assert group.load_checkpoint(str(tmp_path / "ckpt")) == {"step": 4}
        assert ray.get([a.updates.remote() for a in group.actors]) == [4, 4]  # the update count came back too
        again = [train_step(group, sft_step_loss, b)["loss"] for b in later]
        assert again == pytest.approx(first, rel=1e-6)
    finally:
        group.shutdown()
