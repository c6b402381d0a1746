"""A checkpoint waits until the driver has *written* every step before it (the lost-step fault of a killed
reward-model run): the follower answers a barrier only after the records ahead of it are in the sinks."""
import queue
import threading
import time
from types import SimpleNamespace

from rlhf_ray.offline.loop import MetricsFollower
from rlhf_ray.offline.worker import wait_until_logged


class SlowLog:
    """A stage log whose write lags the take (a driver busy drawing its progress bar)."""

    def __init__(self):
        self.steps = []

    def log(self, step, stats, advance=True):
        time.sleep(0.05)
        if advance:
            self.steps.append(step)

    def close(self):
        pass


def _follow(log):
    q, logged = queue.Queue(), queue.Queue()
    follower = MetricsFollower(q, logged, lambda name, start: log)
    follower.start()
    return follower, SimpleNamespace(name="rm", metrics=q, logged=logged)


def _stop(follower):
    follower._stop_event.set()
    follower.join()


def test_the_wait_returns_only_after_every_step_before_it_is_written():
    log = SlowLog()
    follower, job = _follow(log)
    try:
        job.metrics.put(("start", "rm", 0, {}))
        for step in range(1, 6):
            job.metrics.put(("step", "rm", step, {"loss": 1.0}))
        wait_until_logged(job, 5)
        # the old wait (queue empty) returned as soon as step 5 was taken, 50 ms before it was written
        assert log.steps == [1, 2, 3, 4, 5]
    finally:
        _stop(follower)


def test_an_answer_left_for_a_restarted_worker_group_is_not_taken_as_this_one():
    log = SlowLog()
    follower, job = _follow(log)
    try:
        job.logged.put(("rm", 2))  # answered after the group that asked had died
        job.metrics.put(("start", "rm", 2, {}))
        job.metrics.put(("step", "rm", 3, {}))
        done = threading.Event()
        waiter = threading.Thread(target=lambda: (wait_until_logged(job, 3), done.set()), daemon=True)
        waiter.start()
        assert done.wait(5) and log.steps == [3]
    finally:
        _stop(follower)
