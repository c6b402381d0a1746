"""The gloo broadcast group, with ranks as threads of one process (no Ray, no vLLM)."""
import threading

import pytest
import torch

from rlhf_ray.buckets import pack_buckets
from rlhf_ray.sync.collective import CollectiveGroup
from rlhf_ray.utils.net import free_port


def _named():
    g = torch.Generator().manual_seed(0)
    return [(f"layer{i}.weight", torch.randn(32, 16 + i, generator=g)) for i in range(5)] + \
           [("ids", torch.arange(9)), ("half", torch.randn(7, generator=g).to(torch.bfloat16))]


def _run_ranks(world, target):
    port, results, errors = free_port(), {}, []

    def run(rank):
        try:
            group = CollectiveGroup("127.0.0.1", port, rank, world, "gloo", timeout_s=30)
            try:
                results[rank] = target(group, rank)
            finally:
                group.close()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_broadcast_buckets_to_two_receivers_exactly():
    named = _named()

    def target(group, rank):
        if rank == 0:
            return group.send_buckets(pack_buckets(named, bucket_bytes=4096))
        return [(n, t.clone()) for n, t in group.recv_named()]

    results = _run_ranks(3, target)
    assert results[0] >= sum(t.numel() * t.element_size() for _, t in named)   # bytes sent, with alignment
    for rank in (1, 2):
        got = results[rank]
        assert [n for n, _ in got] == [n for n, _ in named]
        assert all(torch.equal(a, b) and a.dtype == b.dtype for (_, a), (_, b) in zip(got, named))


def test_empty_stream_ends_cleanly():
    results = _run_ranks(2, lambda g, r: g.send_buckets([]) if r == 0 else list(g.recv_named()))
    assert results == {0: 0, 1: []}


def test_a_missing_rank_times_out_instead_of_hanging():
    with pytest.raises(Exception, match="(?i)timed? ?out|timeout"):
        CollectiveGroup("127.0.0.1", free_port(), 0, 2, "gloo", timeout_s=2)


def test_nccl_group_is_built_with_the_configured_timeout(monkeypatch):
    """ProcessGroupNCCL without options keeps NCCL's 10-minute default; the sync's timeout must reach it.
    The CPU torch build has no NCCL, so a stand-in records what the group is constructed with."""
    import datetime

    import torch.distributed as dist

    built = []

    class FakeNCCL:
        class Options:
            def __init__(self, is_high_priority_stream=False):
                self._timeout = datetime.timedelta(minutes=10)   # NCCL's default, as in torch

        def __init__(self, store, rank, size, options=None):
            built.append((rank, size, options))

        def shutdown(self):
            pass

    monkeypatch.setattr(dist, "ProcessGroupNCCL", FakeNCCL, raising=False)
    group = CollectiveGroup("127.0.0.1", free_port(), 0, 1, "nccl", timeout_s=37)
    group.close()
    (rank, size, options), = built
    assert (rank, size) == (0, 1)
    assert options is not None and options._timeout == datetime.timedelta(seconds=37)


def test_a_pickled_bucket_header_is_refused_before_the_buffer_is_read():
    """The old wire format (pickled specs) from a peer: the receiver refuses it and unpickles nothing."""
    import pickle

    named = [("w", torch.ones(4))]
    (bucket,) = list(pack_buckets(named, bucket_bytes=1024))
    ran = []

    class Boom:                       # what a hostile peer would send: runs code when unpickled
        def __reduce__(self):
            return ran.append, ("unpickled",)

    payload = pickle.dumps((bucket.specs, Boom()))

    def target(group, rank):
        if rank == 0:              # header and pickled specs only: the receiver must stop before the buffer
            group.broadcast(torch.tensor([bucket.nbytes, len(payload)], dtype=torch.int64))
            group.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
            return None
        with pytest.raises(ValueError, match="not the JSON spec list"):
            list(group.recv_named())
        return "refused"

    assert _run_ranks(2, target)[1] == "refused"
    assert ran == []
