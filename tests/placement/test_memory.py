"""Memory line items on a small hand-checkable shape."""
import pytest

from rlhf_ray.placement.memory import (
    GiB, LearnerSpec, activation_bytes_per_token, engine_items, learner_items, logits_bytes, peak,
)
from rlhf_ray.placement.shapes import ModelShape

S = ModelShape(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, head_dim=16, vocab=1000, tied=False)


def items(**kw):
    spec = dict(head="lm", dtype="bfloat16", world=4, zero_stage=0, offload_optimizer=False, offload_params=False,
                checkpointing=False, tokens=100)
    spec.update(kw)
    return {i.name: i for i in learner_items("policy", S, LearnerSpec(**spec))}


def test_hand_counted_shape():
    # per layer: q 64*64, k 64*32, v 64*32, o 64*64, gate/up 64*128 each, down 128*64, 2 norms of 64
    layer = 4096 + 2048 + 2048 + 4096 + 3 * 8192 + 128
    assert S.params() == 1000 * 64 * 2 + 4 * layer + 64


def test_zero_stages_partition_optimizer_then_gradients_then_weights():
    p = S.params()
    for stage, (w, g, o) in {0: (1, 1, 1), 1: (1, 1, 4), 2: (1, 4, 4), 3: (4, 4, 4)}.items():
        it = items(zero_stage=stage)
        assert it["weights (bfloat16)"].bytes == p * 2 / w
        assert it["gradients"].bytes == p * 2 / g
        assert it["optimizer (Adam m, v, fp32 master)"].bytes == p * 12 / o
    assert "ZeRO-3 gathered layers" in items(zero_stage=3)
    assert items(offload_optimizer=True)["optimizer (Adam m, v, fp32 master)"].host
    assert items(dtype="float32")["optimizer (Adam m, v)"].bytes == p * 8  # no separate fp32 master


def test_lora_trains_only_the_adapter_and_nf4_shrinks_the_base():
    lora = S.lora_params(8, ("q_proj", "v_proj"))
    it = items(lora_params=lora, nf4_double_quant=True, zero_stage=2, world=1)
    assert it["gradients"].bytes == lora * 2 and it["optimizer (Adam m, v, fp32 master)"].bytes == lora * 12
    linear = S.linear_params()
    assert it["base weights (nf4)"].bytes == pytest.approx(linear * 4.127 / 8 + (S.params() - linear) * 2, rel=1e-3)


def test_checkpointing_keeps_layer_inputs_plus_one_layer():
    per_layer = (4 * 64 + 2 * 64 + 2 * 32 + 4 * 128) * 2
    assert activation_bytes_per_token(S, 2, checkpointing=False) == 4 * per_layer
    assert activation_bytes_per_token(S, 2, checkpointing=True) == 4 * 64 * 2 + per_layer
    assert logits_bytes(S, 10, 2, grad=True) == 10 * 1000 * 14


def test_engine_kv_is_what_the_utilization_leaves_and_sleep_frees_the_gpu():
    cap = 10 * GiB
    awake = engine_items(S, dtype="bfloat16", quantization=None, tp=1, utilization=0.5, capacity=cap,
                         enforce_eager=True, sleeps=False)
    assert sum(i.bytes for i in awake) == pytest.approx(0.5 * cap)
    assert peak(awake) == ("generate", pytest.approx(0.5 * cap))
    asleep = engine_items(S, dtype="bfloat16", quantization=None, tp=1, utilization=0.5, capacity=cap,
                          enforce_eager=True, sleeps=True)
    totals = {p: sum(i.bytes for i in asleep if p in i.phases and not i.host) for p in ("score", "train")}
    assert totals == {"score": 0, "train": 0}
    fp8 = engine_items(S, dtype="bfloat16", quantization="fp8", tp=2, utilization=0.5, capacity=cap,
                       enforce_eager=True, sleeps=False)
    assert fp8[0].bytes == (S.linear_params() + (S.params() - S.linear_params()) * 2) / 2


def test_logits_count_the_positions_the_lm_head_runs_over():
    # the learner and the reference run the LM head over the response positions only (logits_to_keep)
    it = items(tokens=100, logit_tokens=20, ref_forward=True)
    assert it["logits (train)"].bytes == logits_bytes(S, 20, 2, grad=True)
    assert it["logits (reference, adapter off)"].bytes == logits_bytes(S, 20, 2, grad=False)
    assert it["activations"].bytes == 100 * activation_bytes_per_token(S, 2, checkpointing=False)
    assert items(tokens=100)["logits (train)"].bytes == logits_bytes(S, 100, 2, grad=True)
