"""Sharing a GPU with the learner: the engine releases its memory after generating and takes back exactly
what each later call needs; on a device that cannot sleep (CPU) nothing is ever released."""
from types import SimpleNamespace

from rlhf_ray.roles.generator.engine import GeneratorEngine


class FakeLLM:
    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, method, kwargs):
        self.calls.append((method,))
        list(kwargs["weights_iterator"])

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def engine(can_sleep: bool) -> GeneratorEngine:
    e = object.__new__(GeneratorEngine)  # the state machine only; no vLLM engine behind it
    e.llm, e.can_sleep, e.asleep, e.version = FakeLLM(), can_sleep, frozenset(), 0
    e.cfg = SimpleNamespace(tensor_parallel_size=1)  # one process: weights cross as an iterator
    e.workers_receive, e.tensor_parallel_size = False, 1  # one process: no broadcast to TP workers
    e.in_place_push = False  # a sleeping engine is a CUDA one: vLLM's reload takes its pushes
    return e


def test_weights_come_back_before_a_push_and_the_cache_before_generating():
    e = engine(can_sleep=True)
    e.release()
    e.release()  # idempotent: one sleep
    e.load_full(iter([]), version=1)
    assert e.llm.calls == [("sleep", 1), ("wake_up", ("weights",)), ("reload_weights",), ("reset_prefix_cache",)]
    assert e.asleep == {"kv_cache"}
    e.reclaim()
    assert e.llm.calls[-1] == ("wake_up", ("kv_cache",)) and not e.asleep
    e.reclaim()  # nothing left to take back
    assert len(e.llm.calls) == 5


def test_a_device_that_cannot_sleep_never_releases():
    e = engine(can_sleep=False)
    e.release()
    e.reclaim()
    assert e.llm.calls == [] and not e.asleep
