"""Splitting a batch over ranks and gathering the results back: pure functions, no Ray."""
import pytest
import torch

from rlhf_ray.learner.dispatch import gather, split_batch


def test_dispatch_round_trip_and_refuses_uneven_shards():
    batch = {"a": torch.arange(12).view(6, 2), "b": torch.arange(6)}
    parts = split_batch(batch, 3)
    assert [len(p["b"]) for p in parts] == [2, 2, 2]
    assert torch.equal(gather([p["a"] for p in parts]), batch["a"])
    with pytest.raises(ValueError, match="does not split evenly"):
        split_batch(batch, 4)
    ragged = gather([torch.ones(1, 2), torch.ones(1, 3)])
    assert ragged.shape == (2, 3) and ragged[0, 2] == 0
