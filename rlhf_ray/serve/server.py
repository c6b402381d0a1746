"""The policy's engine deployment: Ray Serve LLM's `LLMServer`, whose stop also stops its vLLM engine.

Ray 2.60's `LLMServer.__del__` (Serve calls it as a replica stops) closes only the engine's prompt-token
channel; the vLLM `AsyncLLM` behind it is dropped with its process. Its engine core's shared-memory queues
(two `psm_` segments, 160 + 240 MB on this machine, and a semaphore) then outlive the server in /dev/shm:
every stop of `rlhf-ray serve` leaked them. `AsyncLLM.shutdown` stops the engine core and removes them.
"""
from __future__ import annotations

from ray.serve.llm import LLMServer


class PolicyServer(LLMServer):
    async def __del__(self) -> None:
        try:
            await super().__del__()
        finally:
            # Ray's VLLMEngine keeps vLLM's client as `_engine_client` (checked against the installed Ray by
            # tests/serve/test_server.py); None before the engine started
            client = getattr(getattr(self, "engine", None), "_engine_client", None)
            if client is not None:
                client.shutdown()
