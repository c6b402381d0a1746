"""DPO against hand-computed values: label smoothing and response-only sequence log-probs."""
import math

import pytest
import torch

from rlhf_ray.algo import dpo_loss, sequence_logprobs


def test_label_smoothing_hand_computed():
    # margin h = 0.5 * ((-1 - -2) - (-3 - -2)) = 0.5 * (1 - -1) = 1.0
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    eps = 0.2
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=eps)
    sig = 1 / (1 + math.exp(-1.0))
    expected = -(1 - eps) * math.log(sig) - eps * math.log(1 - sig)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert stats["dpo/reward_margin"] == pytest.approx(1.0)
    assert stats["dpo/reward_chosen"] == pytest.approx(0.5) and stats["dpo/reward_rejected"] == pytest.approx(-0.5)
    plain, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert float(plain) == pytest.approx(-math.log(sig), rel=1e-6)


def test_label_smoothing_pulls_a_confident_margin_back():
    """With eps > 0 the loss is minimised at a finite margin: its gradient turns around past it."""
    pc = torch.tensor([10.0], requires_grad=True)
    loss, _ = dpo_loss(pc, torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=1.0, label_smoothing=0.1)
    loss.backward()
    assert pc.grad.item() > 0  # gradient descent lowers the chosen log-prob again


@pytest.mark.parametrize("bad", [{"beta": 0.0}, {"label_smoothing": 0.5}, {"label_smoothing": -0.1}])
def test_bad_hyperparameters_raise(bad):
    z = torch.zeros(1)
    with pytest.raises(ValueError):
        dpo_loss(z, z, z, z, **bad)


def test_sequence_logprobs_sum_response_tokens_only():
    # vocab 2; logits chosen so that log-softmax is easy: uniform -> log(1/2) for every token
    ids = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    prompt_len = torch.tensor([2, 1])
    logits = torch.zeros(2, 4, 2)
    # row 0: response = token at position 2 only (position 3 is padding) -> 1 token
    # row 1: response = positions 1, 2, 3 -> 3 tokens
    out = sequence_logprobs(logits, ids, mask, prompt_len)
    assert torch.allclose(out, torch.tensor([1, 3]) * math.log(0.5))
    # a confident logit on the scored token changes only that row's sum
    logits[0, 1, 1] = 50.0  # position 1 predicts token 2 (= 1)
    out = sequence_logprobs(logits, ids, mask, prompt_len)
    assert out[0].item() == pytest.approx(0.0, abs=1e-6)
    assert out[1].item() == pytest.approx(3 * math.log(0.5))
