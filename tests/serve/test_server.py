"""The policy's engine deployment stops its vLLM engine as Serve stops the replica (server.PolicyServer), checked
against the installed Ray Serve LLM without starting it. (That nothing stays in /dev/shm after a real server
stops: e2e/test_serve_cli.py.)

Slow, and `rlhf_ray.serve.server` imported inside the tests: Ray Serve LLM imports vLLM (12 s of CPU on a
2-core AMD EPYC), which the fast tier, collecting this module too, must not pay (tests/conftest.py)."""
import asyncio
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf_ray.config import ServeConfig
from rlhf_ray.models.kit import resolve_model_path
from rlhf_ray.serve.policy import llm_config

pytestmark = pytest.mark.slow


def test_the_engine_deployment_is_ours():
    from rlhf_ray.serve.server import PolicyServer
    c = llm_config(resolve_model_path("builtin:tiny"), ServeConfig(), {}, "float32")
    assert c.server_cls is PolicyServer


def _source(module: str) -> str:
    return Path(importlib.util.find_spec(module).origin).read_text()  # read, not imported: vLLM's import is slow


def test_where_ray_keeps_vllms_client():
    # PolicyServer reaches the engine through these two private names of Ray 2.60
    assert "self.engine = " in _source("ray.llm._internal.serve.core.server.llm_server")
    assert "self._engine_client = " in _source("ray.llm._internal.serve.engines.vllm.vllm_engine")


def _server(client, calls):
    from rlhf_ray.serve.server import PolicyServer

    async def close_channel():
        calls.append("ray's own stop")
    server = object.__new__(PolicyServer)  # the stop path only; no engine started
    server.engine = SimpleNamespace(_engine_client=client, shutdown=close_channel)
    return server


def _stop(server) -> None:
    asyncio.run(server.__del__())  # as Serve calls it on a stopping replica
    # what a stopped stand-in becomes: Python would call the async __del__ again, unawaited, on collection
    server.__class__ = type("Stopped", (type(server),), {"__del__": lambda self: None})


def test_a_stopping_replica_shuts_its_vllm_engine_down():
    calls = []
    client = SimpleNamespace(shutdown=lambda: calls.append("engine shutdown"))
    _stop(_server(client, calls))
    assert calls == ["ray's own stop", "engine shutdown"]


def test_a_replica_stopped_before_its_engine_started_has_nothing_to_shut():
    calls = []
    _stop(_server(None, calls))
    assert calls == ["ray's own stop"]
