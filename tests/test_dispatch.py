"""Splitting work over ranks and engines and merging the results back (`rlhf_ray.dispatch`): pure functions, no Ray."""
import pytest
import torch

from rlhf_ray.batch import pack_sequences
from rlhf_ray.dispatch import (gather, mean_stats, micro_batches, minibatch_micro_batches, shard_rows, split_batch,
                               split_evenly, split_rows)


def test_dispatch_round_trip_and_refuses_uneven_shards():
    batch = {"a": torch.arange(12).view(6, 2), "b": torch.arange(6)}
    parts = split_batch(batch, 3)
    assert [len(p["b"]) for p in parts] == [2, 2, 2]
    assert torch.equal(gather([p["a"] for p in parts]), batch["a"])
    with pytest.raises(ValueError, match="does not split evenly"):
        split_batch(batch, 4)
    ragged = gather([torch.ones(1, 2), torch.ones(1, 3)])
    assert ragged.shape == (2, 3) and ragged[0, 2] == 0


@pytest.mark.parametrize("n,k", [(0, 1), (5, 2), (7, 3), (2, 4), (9, 9)])
def test_split_evenly_is_contiguous_and_balanced(n, k):
    items = list(range(n))
    parts = split_evenly(items, k)
    assert len(parts) == k
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert [x for part in parts for x in part] == items


def test_split_rejects_zero_parts():
    with pytest.raises(ValueError):
        split_evenly([1], 0)


def test_rows_split_into_equal_contiguous_shards_or_not_at_all():
    seq = pack_sequences([[5, 6]] * 6, [[7] * n for n in (1, 2, 3, 1, 2, 3)], 0)
    shards = split_rows(seq, 3)
    assert [s.response_mask.sum(1).tolist() for s in shards] == [[1, 2], [3, 1], [2, 3]]
    assert [shard_rows(torch.arange(6), r, 3).tolist() for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    for bad in (lambda: split_rows(seq, 4), lambda: shard_rows(torch.arange(6), 0, 4)):
        with pytest.raises(ValueError, match="does not split evenly over 4 ranks"):
            bad()


def test_micro_batches_chunk_a_rank_and_carry_the_whole_minibatch_totals():
    assert [len(m["b"]) for m in micro_batches({"b": torch.arange(7)}, 3)] == [3, 3, 1]
    mask = torch.tensor([[1, 0], [1, 1], [1, 1], [1, 0]])
    rows = torch.tensor([3, 1, 2, 0])
    parts = [minibatch_micro_batches(rows, 1, mask, rank, 2) for rank in range(2)]
    assert [[m["idx"].tolist() for m in p] for p in parts] == [[[3], [1]], [[2], [0]]]
    assert all(m["totals"].tolist() == [[4.0, 6.0]] for p in parts for m in p)  # 4 rows, 6 tokens in all


def test_rank_means_are_the_batch_mean_of_equal_shards():
    assert mean_stats([{"a": 1.0, "b": 4.0}, {"a": 3.0, "b": 0.0}]) == {"a": 2.0, "b": 2.0}
