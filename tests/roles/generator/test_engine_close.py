"""Closing an engine frees what outlives its process: a tensor-parallel engine's workers keep their message
queues and CPU all-reduce buffers in /dev/shm (160-240 MB a TP=2 engine on this machine), which only the engine
core's shutdown removes, so a group closes its TP engines before it kills their actors (one TP=2 run of
roles/generator/test_tp_sync.py left four such segments behind before, none after), and the close removes what a
worker ended in that shutdown left (a segment and two buffers, once in four `make test` runs)."""
import uuid
from pathlib import Path
from types import SimpleNamespace

import ray
from shm_holder import hold

from rlhf_ray.roles.generator.engine import GeneratorEngine
from rlhf_ray.roles.generator.group import GeneratorGroup


def _engine(tp: int, calls: list) -> GeneratorEngine:
    e = object.__new__(GeneratorEngine)  # the close path only; no vLLM engine behind it
    core = SimpleNamespace(shutdown=lambda: calls.append("core shutdown"))
    e.llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=core))
    e.tensor_parallel_size, e._scratch = tp, "/nonexistent"
    return e


def test_a_tp_engine_shuts_its_core_down_on_close_and_an_in_process_one_has_nothing_to(monkeypatch):
    import vllm.distributed.parallel_state as ps
    monkeypatch.setattr(ps, "cleanup_dist_env_and_memory", lambda: None)
    for tp, want in ((2, ["core shutdown"]), (1, [])):
        calls = []
        e = _engine(tp, calls)
        e.close()
        assert calls == want and e.llm is None


def test_a_tp_engine_removes_what_a_worker_killed_in_its_shutdown_left_in_dev_shm(monkeypatch):
    import vllm.distributed.parallel_state as ps
    monkeypatch.setattr(ps, "cleanup_dist_env_and_memory", lambda: None)
    left = Path(f"/dev/shm/rlhf_ray_test_{uuid.uuid4().hex}")
    worker = hold(left)  # a TP worker below the engine's process, its buffer mapped
    try:
        e = _engine(2, [])
        # vLLM's shutdown ends a worker that does not exit in time: nothing of it removes its buffer
        e.llm.llm_engine.engine_core.shutdown = lambda: (worker.kill(), worker.wait())
        e.close()
        assert not left.exists()
    finally:
        worker.kill()
        worker.wait()
        left.unlink(missing_ok=True)


class _Actor:
    def __init__(self, log):
        self.close = SimpleNamespace(remote=lambda: log.append(("close", self)))


def test_a_group_closes_its_engines_before_it_kills_them(monkeypatch):
    log = []
    monkeypatch.setattr(ray, "get", lambda refs, timeout=None: refs)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=False: log.append(("kill", actor)))
    for tp in (2, 1):
        log.clear()
        group = object.__new__(GeneratorGroup)
        group.cfg, group.actors = SimpleNamespace(tensor_parallel_size=tp), [_Actor(log), _Actor(log)]
        actors = list(group.actors)
        group.shutdown()
        assert log == [("close", a) for a in actors] + [("kill", a) for a in actors] and group.actors == []
