"""`rlhf-ray serve`: the policy behind Ray Serve answers OpenAI-style requests; the reward service scores."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port

from rlhf_ray.models.kit import resolve_model_path

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def start(what: str, *overrides):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", "serve", "configs/quickstart.yaml",
                             f"serve.port={port}", *overrides, "--what", what, "--seconds", "600"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited early:\n{proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("the server did not come up in 240 s")


def stop(proc):
    proc.send_signal(signal.SIGTERM)  # the CLI shuts Serve and its own Ray down
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("serve did not stop on SIGTERM")


def test_policy_server_answers_openai_requests():
    proc, url = start("policy", f"serve.model={resolve_model_path('builtin:tiny')}", "serve.max_tokens=16")
    try:
        models = httpx.get(url + "/v1/models", timeout=30).json()
        assert models["data"][0]["id"] == "rlhf-ray-policy"
        r = httpx.post(url + "/v1/completions", json={"prompt": "review of the fox :", "max_tokens": 8, "n": 2,
                                                      "temperature": 0, "seed": 1}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["choices"]) == 2 and body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy
        assert 0 < body["usage"]["completion_tokens"] <= 16
        bad = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 999}, timeout=30)
        assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]
        chat = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 4}, timeout=60)
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        stop(proc)


def test_reward_service_scores_over_http():
    spec = "reward.sources=[{kind: function, path: 'rlhf_ray.data.builtin_reviews:vader_reward'}]"
    proc, url = start("reward", spec)
    try:
        r = httpx.post(url + "/score", json={"prompts": ["a", "b"], "responses": [" great fun .", " awful ."]},
                       timeout=60)
        assert r.status_code == 200, r.text
        good, bad = r.json()["scores"]
        assert good > 0 > bad
    finally:
        stop(proc)
