"""Micro-batching must not change the objective: the learner's row-share weighting times our token
weight reproduces the token-mean over the whole minibatch."""
import torch

from rlhf_ray import algo
from rlhf_ray.rl.micro import micro_batches as _micro, token_weight as _token_weight


def test_micro_batches_reproduce_the_minibatch_token_mean():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float)
    loss_mat = torch.randn(5, 4)
    rows = torch.tensor([4, 0, 2, 1, 3])
    whole = algo.aggregate(loss_mat[rows], mask[rows], "token-mean")
    total = 0.0
    for mb in _micro(rows, 2, mask):
        idx = mb["idx"]
        part = algo.aggregate(loss_mat[idx], mask[idx], "token-mean") * _token_weight("token-mean", mask[idx], mb)
        total += part * len(idx) / len(rows)  # the learner's row-share weighting
    assert torch.allclose(total, whole, atol=1e-6)


def test_sequence_mean_needs_no_reweighting():
    mask = torch.ones(3, 2)
    mb = _micro(torch.arange(3), 2, mask)[0]
    assert _token_weight("seq-mean-token-mean", mask[:2], mb) == 1.0
