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
