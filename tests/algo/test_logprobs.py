import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_ray.algo import entropy_from_logits, token_logprobs, token_logprobs_and_entropy


def _reference_logprobs(logits, tokens, temperature=1.0):
    return F.log_softmax(logits.double() / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _reference_entropy(logits, temperature=1.0):
    return torch.distributions.Categorical(logits=logits.double() / temperature).entropy()


def test_hand_computed_two_token_vocabulary():
    # softmax([0, ln 3]) = [1/4, 3/4].
    logits = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)
    lp = token_logprobs(logits, torch.tensor([[1]]))
    assert lp.item() == pytest.approx(math.log(0.75), abs=1e-12)
    h = entropy_from_logits(logits)
    assert h.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-12)
    # temperature 2: softmax([0, ln 3 / 2]) = [1, sqrt 3] / (1 + sqrt 3).
    p1 = math.sqrt(3) / (1 + math.sqrt(3))
    assert token_logprobs(logits, torch.tensor([[1]]), 2.0).item() == pytest.approx(math.log(p1), abs=1e-12)
    assert entropy_from_logits(logits, 2.0).item() == pytest.approx(
        -(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1)), abs=1e-12
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [None, 1, 5])
def test_matches_log_softmax_gather(temperature, chunk_rows):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 50, generator=g) * 4
    tokens = torch.randint(0, 50, (3, 7), generator=g)
    lp = token_logprobs(logits, tokens, temperature, chunk_rows=chunk_rows)
    assert lp.shape == (3, 7) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), _reference_logprobs(logits, tokens, temperature), rtol=0, atol=1e-5)
    h = entropy_from_logits(logits, temperature, chunk_rows=chunk_rows)
    torch.testing.assert_close(h.double(), _reference_entropy(logits, temperature), rtol=0, atol=1e-5)
    lp2, h2 = token_logprobs_and_entropy(logits, tokens, temperature, chunk_rows=chunk_rows)
    torch.testing.assert_close(lp2.double(), _reference_logprobs(logits, tokens, temperature), rtol=0, atol=1e-5)
    torch.testing.assert_close(h2.double(), _reference_entropy(logits, temperature), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_one_pass_gives_the_log_probs_gradient_and_an_entropy_without_one(dtype):
    """`token_logprobs_and_entropy` (what an update without an entropy bonus calls): the log-probs' gradient is
    `token_logprobs`' own, over several row chunks and a temperature; the entropy is the statistic, no graph."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 5, 40, generator=g, dtype=torch.float64) * 3
    tokens = torch.randint(0, 40, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g, dtype=torch.float64)
    grads = []
    for fn in (token_logprobs, lambda *a, **k: token_logprobs_and_entropy(*a, **k)[0]):
        logits = base.to(dtype).requires_grad_()
        (fn(logits, tokens, 0.7, chunk_rows=4) * weights.to(logits.dtype)).sum().backward()
        grads.append(logits.grad)
    assert torch.equal(grads[0], grads[1])
    lp, h = token_logprobs_and_entropy(base.to(dtype).requires_grad_(), tokens, 0.7, chunk_rows=4)
    assert lp.requires_grad and not h.requires_grad
    torch.testing.assert_close(h.double(), _reference_entropy(base.to(dtype), 0.7), rtol=0,
                               atol=1e-12 if dtype == torch.float64 else 1e-5)


def test_gradients_match_reference():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    weights = torch.randn(2, 5, generator=g, dtype=torch.float64)
    (token_logprobs(logits, tokens, 0.9, chunk_rows=3) * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    (_reference_logprobs(logits, tokens, 0.9) * weights).sum().backward()
    torch.testing.assert_close(ours, logits.grad, rtol=0, atol=1e-12)

    logits.grad = None
    (entropy_from_logits(logits, chunk_rows=4) * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    (_reference_entropy(logits) * weights).sum().backward()
    torch.testing.assert_close(ours, logits.grad, rtol=0, atol=1e-12)


def test_bf16_logits_are_computed_in_fp32():
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 4, 1000, generator=g) * 5).bfloat16()
    tokens = torch.randint(0, 1000, (2, 4), generator=g)
    lp = token_logprobs(logits, tokens)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), _reference_logprobs(logits.float(), tokens), rtol=0, atol=1e-5)


def test_bf16_logits_get_a_bf16_gradient_equal_to_the_fp32_one_rounded():
    """The backward writes the logits' own dtype (no fp32 copy of a (B, T, V) gradient) and its values are
    the fp32 computation's, rounded once to bf16; across several row chunks and a temperature."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(3, 5, 300, generator=g) * 4
    tokens = torch.randint(0, 300, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g)
    low = base.bfloat16().requires_grad_()
    (token_logprobs(low, tokens, 0.8, chunk_rows=4) * weights).sum().backward()
    want = base.bfloat16().double().requires_grad_()
    (_reference_logprobs(want, tokens, 0.8) * weights.double()).sum().backward()
    assert low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad.double(), want.grad.bfloat16().double(), rtol=0, atol=2e-3)


def test_entropy_with_masked_vocabulary_is_finite():
    logits = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf]]])
    assert entropy_from_logits(logits).item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert token_logprobs(logits, torch.tensor([[0]])).item() == pytest.approx(math.log(0.5), abs=1e-6)
    lp, h = token_logprobs_and_entropy(logits, torch.tensor([[0]]))
    assert (lp.item(), h.item()) == (pytest.approx(math.log(0.5), abs=1e-6), pytest.approx(math.log(2.0), abs=1e-6))


def test_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(torch.zeros(1, 1, 2), -1.0)
