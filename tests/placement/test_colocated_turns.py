"""A colocated rank's generation and update, called at once (the overlap mode): side by side where the cores are
shared (CPU), one after the other where the phases own the device (a GPU, whose memory plan counts them apart).
The rank is the plain class (no Ray): its engine and learner worker are stand-ins that record when they ran."""
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.placement.construct import colocated_shares
from rlhf_ray.placement.colocated import ColocatedRank
from rlhf_ray.placement.shared import RoleSections
from rlhf_ray.utils.phases import set_phase_threads


class Recorder:
    def __init__(self):
        self.spans = {}

    def run(self, name: str, seconds: float = 0.3):
        t0 = time.monotonic()
        time.sleep(seconds)
        self.spans[name] = (t0, time.monotonic())


def rank(can_sleep: bool) -> tuple[ColocatedRank, Recorder]:
    rec = Recorder()
    cfg = load_config(None, ["cluster.torch_threads=1"])
    r = ColocatedRank(0, 1, 1, sections=RoleSections.of(cfg), shares=colocated_shares(cfg, 1, "cpu"))
    r.engine = SimpleNamespace(generate=lambda prompts, n, **kw: rec.run("generate"), release=lambda: None,
                               can_sleep=can_sleep)  # built with vLLM's sleep mode where the plan makes it sleep
    r._worker = SimpleNamespace(update=lambda *args: rec.run("update") or {})
    return r, rec


@pytest.mark.parametrize("can_sleep", [False, True], ids=["cpu", "gpu"])
def test_a_generation_and_an_update_share_the_cores_or_take_turns_on_the_device(can_sleep, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))  # a rank sets it for its process: restored after the test
    r, rec = rank(can_sleep)
    gen = threading.Thread(target=r.generate, args=([[1, 2]], 1, {}, True))
    gen.start()
    time.sleep(0.05)  # the generation has the device (or its cores) first
    try:
        r.update(None, [], 0.0, True)
    finally:
        gen.join(5)
        set_phase_threads(threads)  # this test process's own threads and cores, as they were
    (g0, g1), (u0, u1) = rec.spans["generate"], rec.spans["update"]
    overlapped = u0 < g1 and g0 < u1
    assert overlapped != can_sleep, rec.spans


def test_every_phase_that_runs_alone_runs_on_the_ranks_one_device_thread(monkeypatch):
    """Ray calls a rank's engine methods on one thread and the others on another; OpenMP keeps a team of workers
    per calling thread, and a pass on a team other than the last one's ran 2-4x slower op by op (the tiny
    model's reference pass after a generation: 33-49 ms against 20-23). So every phase that has the device to
    itself runs on one thread of the rank's, whichever thread called it; one beside another keeps its caller's."""
    import rlhf_ray.placement.colocated as colocated
    ran = {}

    def note(name):
        ran.setdefault(name, set()).add(threading.get_native_id())

    r, _ = rank(can_sleep=False)
    r.engine.generate = lambda prompts, n, **kw: note("generate")
    r.reward = SimpleNamespace(score=lambda prompts, responses, team, finished: (note("reward") or [0.0], {}))
    r.reference = SimpleNamespace(logprobs=lambda seq, team: note("reference"))
    r._skip_full = None
    r._worker = SimpleNamespace(update=lambda *args: note("update") or SimpleNamespace())
    monkeypatch.setattr(colocated, "hand_over", lambda *args: note("sync") or 0.0)
    monkeypatch.setattr(colocated.ColocatedRank, "learner", None, raising=False)

    def on_a_thread_of_its_own(fn, *args):
        failed = []
        t = threading.Thread(target=lambda: _record_failure(failed, fn, *args))
        t.start()
        t.join(5)
        assert not failed, failed  # a phase that raised on its thread ran nowhere

    threads = torch.get_num_threads()
    try:
        on_a_thread_of_its_own(r.generate, [[1, 2]], 1, {}, False)      # Ray's engine thread
        on_a_thread_of_its_own(r.score, ["p"], ["r"], [True], None)       # Ray's default thread
        on_a_thread_of_its_own(r.update, None, [], 0.0, False)
        on_a_thread_of_its_own(r.sync, "full", 1)
        alone = set().union(*ran.values())
        assert set(ran) == {"generate", "reward", "reference", "update", "sync"}, ran
        assert len(alone) == 1 and threading.get_native_id() not in alone, ran
        on_a_thread_of_its_own(r.generate, [[1, 2]], 1, {}, True)       # beside an update: its caller's thread
        assert ran["generate"] - alone, ran
    finally:
        set_phase_threads(threads)


def _record_failure(failed: list, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - handed to the test's own thread
        failed.append(repr(e))
