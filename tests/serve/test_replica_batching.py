"""The reward service batches concurrent requests inside a real Ray Serve replica (local Ray): the
deployment `rlhf_ray.serve.reward.reward_application` builds, behind Serve's HTTP proxy on 127.0.0.1.

The reward source is a probe (`rows_in_call` below): each response's score is the number of rows in the
call that scored it, times 1000, plus the response's own number, so every caller learns both the size of
the batch it rode in and that it got its own score back."""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.slow

REQUESTS = 8  # = serve.reward_max_batch_size: one full batch when all are gathered


def rows_in_call(prompts: list[str], responses: list[str]) -> list[float]:
    """The probe reward function (runs in the replica): 1000 * rows in this call + int(response)."""
    return [1000.0 * len(prompts) + int(r) for r in responses]


@pytest.fixture
def reward_url(ray_local, tmp_path):
    from ray import serve

    from rlhf_ray.config import load_config
    from rlhf_ray.pipeline import StageOutputs
    from rlhf_ray.serve.reward import reward_application
    from rlhf_ray.utils.net import free_port

    # a long wait: the batch closes as soon as it is full, so it costs nothing unless the batch cannot fill
    probe = "tests.serve.test_replica_batching:rows_in_call"  # the replica imports it (Ray adds the cwd)
    cfg = load_config(None, [f"reward.sources=[{{kind: function, path: '{probe}'}}]",
                             f"serve.reward_max_batch_size={REQUESTS}", "serve.reward_batch_wait_s=10.0"])
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(reward_application(cfg.reward, cfg.serve, StageOutputs(tmp_path).resolve, "cpu", cpus=1),
                  name="reward", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def test_concurrent_requests_are_scored_in_one_batch_by_the_replica(reward_url):
    with httpx.Client(base_url=reward_url, timeout=60) as client:
        assert client.get("/health").json() == {"status": "ok"}

        def one(i: int) -> list[float]:
            r = client.post("/score", json={"prompts": [f"p{i}"], "responses": [str(i)]})
            assert r.status_code == 200, r.text
            return r.json()["scores"]

        with ThreadPoolExecutor(REQUESTS) as pool:
            got = list(pool.map(one, range(REQUESTS)))
    assert [len(s) for s in got] == [1] * REQUESTS
    assert [int(s[0]) % 1000 for s in got] == list(range(REQUESTS))  # each caller got its own score back
    sizes = Counter(int(s[0]) // 1000 for s in got)
    assert sizes == {REQUESTS: REQUESTS}, f"batch sizes seen by the reward function: {dict(sizes)}"
