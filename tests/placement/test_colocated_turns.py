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
