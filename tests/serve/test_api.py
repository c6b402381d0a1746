"""The HTTP surface with a fake backend: OpenAI shapes, usage counts, and clear 400s."""
import pytest
from fastapi.testclient import TestClient

from rlhf_ray.serve.api import policy_app, reward_app


class EchoBackend:
    model_name, max_tokens = "tiny-policy", 32

    def __init__(self):
        self.calls = []

    def complete(self, prompts, *, n, max_tokens, temperature, top_p, stop, seed):
        if any(len(p) > 100 for p in prompts):
            raise ValueError("prompt 0 has 101 tokens; that exceeds the model's context")
        self.calls.append(dict(prompts=prompts, n=n, max_tokens=max_tokens, stop=stop, seed=seed))
        return [([(f"{p}!{j}", "stop", 2) for j in range(n)], len(p.split())) for p in prompts]

    def chat_prompt(self, messages):
        return " | ".join(m["content"] for m in messages)


@pytest.fixture
def client():
    backend = EchoBackend()
    return TestClient(policy_app(backend)), backend


def test_models_and_health(client):
    c, _ = client
    assert c.get("/v1/models").json()["data"][0]["id"] == "tiny-policy"
    assert c.get("/health").json()["status"] == "ok"


def test_completions_shape_and_usage(client):
    c, backend = client
    r = c.post("/v1/completions", json={"prompt": ["a b", "c"], "n": 2, "max_tokens": 5, "stop": "\n", "seed": 3})
    assert r.status_code == 200
    body = r.json()
    assert [ch["text"] for ch in body["choices"]] == ["a b!0", "a b!1", "c!0", "c!1"]
    assert [ch["index"] for ch in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
    assert backend.calls[0]["stop"] == ["\n"] and backend.calls[0]["seed"] == 3


def test_chat_completions(client):
    c, _ = client
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "hi!0"}


@pytest.mark.parametrize("body, status, needle", [
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 999}, 400, "exceeds this server's limit of 32"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "is not served here"),
    ({"prompt": []}, 400, "must not be empty"),
    ({"prompt": "x" * 101}, 400, "exceeds the model's context"),
])
def test_bad_requests_name_the_field(client, body, status, needle):
    c, _ = client
    r = c.post("/v1/completions", json=body)
    assert r.status_code == status
    assert needle in r.json()["error"]["message"]


def test_reward_service():
    c = TestClient(reward_app(lambda p, r: ([float(len(x)) for x in r], {})))
    assert c.post("/score", json={"prompts": ["a", "b"], "responses": ["xx", "y"]}).json() == {"scores": [2.0, 1.0]}
    bad = c.post("/score", json={"prompts": ["a"], "responses": []})
    assert bad.status_code == 400 and "differ in length" in bad.json()["error"]["message"]
