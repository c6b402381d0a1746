import math

import pytest
import torch

from rlhf_ray.algo import masked_mean, masked_sum, masked_var, masked_whiten

# Real tokens: 1, 2, 3 | 5, 6 (mean 3.4, squared deviations sum to 17.2). Padding holds large values
# that must not leak into any result.
X = torch.tensor([[1.0, 2.0, 3.0, 1e6], [5.0, 6.0, -1e6, 7e5]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)


@pytest.mark.parametrize("mask", [MASK, MASK.bool()], ids=["float", "bool"])
def test_masked_sum_and_mean_hand_computed(mask):
    assert masked_sum(X, mask).item() == 17.0
    assert masked_sum(X, mask, dim=-1).tolist() == [6.0, 11.0]
    assert masked_mean(X, mask).item() == pytest.approx(3.4, abs=1e-12)
    assert masked_mean(X, mask, dim=-1).tolist() == pytest.approx([2.0, 5.5], abs=1e-12)


def test_masked_var_hand_computed():
    assert masked_var(X, MASK).item() == pytest.approx(17.2 / 4, abs=1e-12)
    assert masked_var(X, MASK, unbiased=False).item() == pytest.approx(17.2 / 5, abs=1e-12)


def test_masked_whiten_hand_computed():
    std = math.sqrt(4.3 + 1e-8)
    expected = torch.tensor([[-2.4, -1.4, -0.4, 0.0], [1.6, 2.6, 0.0, 0.0]], dtype=torch.float64) / std
    torch.testing.assert_close(masked_whiten(X, MASK), expected, rtol=0, atol=1e-12)
    unshifted = masked_whiten(X, MASK, shift_mean=False)
    torch.testing.assert_close(unshifted, (expected + 3.4) * MASK, rtol=0, atol=1e-12)


def test_whitened_has_zero_mean_unit_variance_over_real_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64) * 3 + 2
    mask = (torch.arange(9) < torch.tensor([9, 1, 4, 0, 7, 3]).unsqueeze(-1)).double()
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert (w[mask == 0] == 0).all()


def test_empty_masks_give_zero_not_nan():
    x = torch.randn(2, 3)
    empty = torch.zeros(2, 3)
    assert masked_sum(x, empty).item() == 0.0
    assert masked_mean(x, empty).item() == 0.0
    assert masked_mean(x, empty, dim=-1).tolist() == [0.0, 0.0]
    assert masked_var(x, empty).item() == 0.0
    assert masked_whiten(x, empty).abs().sum().item() == 0.0
    one_row_empty = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert masked_mean(x, one_row_empty, dim=-1)[1].item() == 0.0


def test_single_token_has_zero_variance_and_whitens_to_zero():
    x = torch.tensor([[4.0, 9.0]])
    one = torch.tensor([[1.0, 0.0]])
    assert masked_var(x, one).item() == 0.0
    assert masked_whiten(x, one).tolist() == [[0.0, 0.0]]


def test_constant_input_whitens_to_zero():
    x = torch.full((3, 4), 7.0)
    assert masked_whiten(x, torch.ones(3, 4)).abs().max().item() == 0.0


def test_gradient_does_not_reach_padding():
    x = X.clone().requires_grad_(True)
    masked_mean(x, MASK).backward()
    torch.testing.assert_close(x.grad, MASK / 5)
