"""Our HTTP pieces without Ray: the Bearer check, field-naming 400s, the reward service and its batching."""
import asyncio

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from rlhf_ray.serve.api import name_bad_fields, require_key, reward_app
from rlhf_ray.serve.reward import BatchedScorer


class Body(BaseModel):
    n: int


def _app(key=None):
    app = FastAPI()
    name_bad_fields(app)
    if key:
        require_key(app, key)

    @app.post("/v1/x")
    def x(body: Body):
        return {"n": body.n}

    @app.get("/-/healthz")
    def healthz():
        return "ok"
    return TestClient(app)


@pytest.mark.parametrize("headers, status", [
    ({}, 401), ({"Authorization": "Bearer nope"}, 401), ({"Authorization": "sekrit"}, 401),
    ({"Authorization": "Basic sekrit"}, 401), ({"Authorization": "Bearer sekrit"}, 200),
    ({"authorization": "bearer sekrit"}, 200),
])
def test_bearer_key(headers, status):
    r = _app("sekrit").post("/v1/x", json={"n": 1}, headers=headers)
    assert r.status_code == status
    if status == 401:
        assert "API key" in r.json()["error"]["message"] and r.headers["www-authenticate"] == "Bearer"


def test_health_probe_needs_no_key():
    assert _app("sekrit").get("/-/healthz").status_code == 200


def test_bad_fields_and_bad_json_are_named_400s():
    c = _app()
    r = c.post("/v1/x", json={"n": "three"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and r.json()["error"]["message"].startswith("n:")
    r = c.post("/v1/x", content=b"{bad", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_reward_service():
    async def score(prompts, responses):
        return [float(len(x)) for x in responses]
    c = TestClient(reward_app(score))
    assert c.post("/score", json={"prompts": ["a", "b"], "responses": ["xx", "y"]}).json() == {"scores": [2.0, 1.0]}
    bad = c.post("/score", json={"prompts": ["a"], "responses": []})
    assert bad.status_code == 400 and "differ in length" in bad.json()["error"]["message"]


def test_reward_batches_concurrent_requests(monkeypatch):
    from ray.serve import batching  # outside a replica its max_ongoing_requests check has nothing to read
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda s: None)
    calls = []

    def score_fn(prompts, responses):
        calls.append(len(prompts))
        return [len(p) + len(r) for p, r in zip(prompts, responses)], {}

    async def main():
        scorer = BatchedScorer(score_fn, max_batch_size=8, wait_s=0.2)
        reqs = [([f"p{i}"] * (i + 1), ["r" * i] * (i + 1)) for i in range(5)]
        out = await asyncio.gather(*(scorer(p, r) for p, r in reqs))
        return scorer, out

    scorer, out = asyncio.run(main())
    assert out == [[float(2 + i)] * (i + 1) for i in range(5)]  # each caller gets its own scores back
    assert scorer.batch_sizes == [5] and calls == [15]  # five requests, one forward pass
