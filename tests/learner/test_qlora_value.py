"""PPO's critic under QLoRA: a 4-bit NF4 backbone, its 1-output value head kept in full precision (a 4-bit
layer with one output row fails inside bitsandbytes), trained through LoRA and the head."""
import pytest
import torch

from tests.learner.helpers import make_learner, token_batches

pytestmark = pytest.mark.slow


def test_qlora_value_model_quantizes_the_backbone_not_the_head_and_trains():
    learner = make_learner(kind="value", qlora=True, lr=1e-2)
    kinds = {n: type(m).__name__ for n, m in learner.hf_model.named_modules()}
    assert "Linear4bit" in kinds.values()
    head = learner.hf_model.score.modules_to_save["default"]  # peft trains a copy of the head
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    before = head.weight.detach().clone()

    def loss_fn(learner, mb):  # pull every value towards 1
        v = learner.forward_values(mb["input_ids"], mb["attention_mask"])
        return ((v - 1) ** 2).mean(), {}

    losses = [learner.train_step(loss_fn, [b])["loss"] for b in token_batches(6)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert float((head.weight - before).abs().max()) > 1e-3  # the head itself trained
