"""Phase threads and core pinning: disjoint slices for roles that run at the same time."""
import os
import threading

import pytest
import torch

from rlhf_ray.utils import phases


@pytest.mark.skipif(len(phases._ALL_CORES) < 2, reason="needs 2 cores to pin two disjoint slices")
def test_pinning_moves_every_thread_and_unpinning_restores_all_cores():
    before = torch.get_num_threads()
    ready, done = threading.Event(), threading.Event()
    seen = {}

    def worker():  # a thread that already exists when the phase starts, like an OpenMP worker
        ready.set()
        done.wait(10)
        seen["mask"] = sorted(os.sched_getaffinity(0))

    t = threading.Thread(target=worker)
    t.start()
    ready.wait(10)
    try:
        phases.set_phase_threads(1, (1, None))
        assert sorted(os.sched_getaffinity(0)) == phases._ALL_CORES[1:]
        done.set()
        t.join(10)
        assert seen["mask"] == phases._ALL_CORES[1:]
        assert torch.get_num_threads() == 1
    finally:
        phases.set_phase_threads(before)
    assert sorted(os.sched_getaffinity(0)) == phases._ALL_CORES


def test_side_by_side_gives_each_phase_its_own_cores():
    assert phases.side_by_side(2, 1) == ((1, (0, 1)), (1, (1, 2)))
    assert phases.side_by_side(8, 3) == ((3, (0, 3)), (5, (3, 8)))
    assert phases.side_by_side(4, 9) == ((3, (0, 3)), (1, (3, 4)))  # the second phase keeps one core
    assert phases.side_by_side(1, 1) == ((1, None), (1, None))      # one core cannot be split


@pytest.mark.skipif(len(phases._ALL_CORES) < 2, reason="needs 2 cores to pin two disjoint slices")
def test_a_thread_share_pins_and_sizes_only_the_calling_thread():
    """Two phases in one process (a colocated rank's engine thread beside its learner thread): each thread
    takes its own team size and cores, the other keeps its own."""
    before, main_mask = torch.get_num_threads(), sorted(os.sched_getaffinity(0))
    seen = {}

    def engine_thread():
        phases.set_thread_share(1, (0, 1))
        seen["threads"], seen["mask"] = torch.get_num_threads(), sorted(os.sched_getaffinity(0))

    t = threading.Thread(target=engine_thread)
    t.start()
    t.join(10)
    try:
        assert seen == {"threads": 1, "mask": phases._ALL_CORES[:1]}
        assert torch.get_num_threads() == before and sorted(os.sched_getaffinity(0)) == main_mask
        phases.set_thread_share(1, (1, 2))
        assert sorted(os.sched_getaffinity(0)) == phases._ALL_CORES[1:2]
        phases.set_phase_threads(before)  # the next whole-process phase takes every core again
        assert sorted(os.sched_getaffinity(0)) == phases._ALL_CORES and torch.get_num_threads() == before
    finally:
        phases.set_phase_threads(before)
