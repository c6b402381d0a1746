"""`rlhf-ray serve` with the official `openai` client: the policy on Ray Serve LLM (streaming, logprobs, n,
stop, adapters by name, API key, errors naming the field). (The reward service: test_train_cli.py.)

One server for the whole module (vLLM start-up on CPU takes about a minute or two). `openai` is imported where
it is used: the fast tier collects this module too, and the client's import is a CPU-second a worker.
"""
import time
from pathlib import Path

import httpx
import pytest
from helpers import serve, stop_process

from rlhf_ray.models.kit import resolve_model_path
from rlhf_ray.utils.shm import descendants, mapped_by

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key-123"
PROMPT = "review of the fox :"


def start(what: str, *overrides, env_extra=None, probe="/v1/models"):
    return serve(what, *overrides, probe=probe, headers={"Authorization": f"Bearer {KEY}"}, env_extra=env_extra)


def stop(proc):
    if not stop_process(proc):  # the CLI shuts Serve and its own Ray down
        pytest.fail("serve did not stop on SIGTERM")


def make_adapter(base: str, out: Path) -> Path:
    """A LoRA adapter on the tiny policy with random (non-zero) B, so it visibly changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    base = resolve_model_path("builtin:tiny")
    adapter = make_adapter(base, tmp_path_factory.mktemp("adapter") / "pos")
    proc, url = start("policy", f"serve.model={base}", "serve.max_tokens=16", f"serve.adapters={{pos: {adapter}}}",
                      env_extra={"RLHF_RAY_API_KEY": KEY})
    import openai
    try:
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0), url
    finally:
        shm = mapped_by(descendants(proc.pid))  # the engine core's queues (made as the first request comes)
        stop(proc)
    assert shm, "the serving processes map nothing in /dev/shm: this check would pass whatever the stop did"
    left = sorted(str(f) for f in shm if f.exists())  # before server.PolicyServer: 2 segments (400 MB), a semaphore
    assert not left, f"the stopped server left these in /dev/shm: {left}"


def test_models_lists_base_and_adapter(policy):
    client, _ = policy
    assert [m.id for m in client.models.list().data] == ["rlhf-ray-policy", "rlhf-ray-policy:pos"]


def test_completions_n_seed_usage(policy):
    client, _ = policy
    kw = dict(model="rlhf-ray-policy", prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=7)
    r, again = client.completions.create(**kw), client.completions.create(**kw)
    assert len(r.choices) == 3 and [c.text for c in r.choices] == [c.text for c in again.choices]  # seeded
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens > 0


def test_logprobs(policy):
    client, _ = policy
    r = client.completions.create(model="rlhf-ray-policy", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 6 and all(x <= 0 for x in lp.token_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy = the best


def test_stop_sequence_cuts_the_text(policy):
    client, _ = policy
    full = client.completions.create(model="rlhf-ray-policy", prompt=PROMPT, max_tokens=16, temperature=0)
    text = full.choices[0].text
    cut = text.strip()[:2] if text.strip() else "e"
    r = client.completions.create(model="rlhf-ray-policy", prompt=PROMPT, max_tokens=16, temperature=0, stop=[cut])
    assert cut not in r.choices[0].text and r.choices[0].finish_reason == "stop"


def _stream_equals_plain(create, piece):
    plain = piece(create(stream=False))
    t0, arrivals, parts = time.perf_counter(), [], []
    for chunk in create(stream=True):
        if chunk.choices:
            arrivals.append(time.perf_counter() - t0)
            parts.append(piece(chunk) or "")
    end = time.perf_counter() - t0
    assert len(parts) > 2 and arrivals[0] < end  # chunks arrive one by one, not in one final body
    assert "".join(parts) == plain


def test_streaming_completions(policy):
    client, _ = policy
    _stream_equals_plain(lambda stream: client.completions.create(model="rlhf-ray-policy", prompt=PROMPT,
                                                                  max_tokens=16, temperature=0, stream=stream),
                         lambda r: r.choices[0].text)


def test_streaming_chat(policy):
    client, _ = policy
    msgs = [{"role": "user", "content": PROMPT}]
    _stream_equals_plain(lambda stream: client.chat.completions.create(model="rlhf-ray-policy", messages=msgs,
                                                                       max_tokens=16, temperature=0, stream=stream),
                         lambda r: r.choices[0].message.content if hasattr(r.choices[0], "message")
                         else r.choices[0].delta.content)


def test_chat_defaults_to_the_server_limit(policy):
    client, _ = policy
    r = client.chat.completions.create(model="rlhf-ray-policy", messages=[{"role": "user", "content": "hi"}],
                                       temperature=0)
    assert r.choices[0].message.role == "assistant" and 0 < r.usage.completion_tokens <= 16


def test_adapter_by_name_changes_the_output(policy):
    client, _ = policy
    kw = dict(prompt=PROMPT, max_tokens=12, temperature=0)
    base = client.completions.create(model="rlhf-ray-policy", **kw)
    tuned = client.completions.create(model="rlhf-ray-policy:pos", **kw)
    assert tuned.model == "rlhf-ray-policy:pos" and tuned.choices[0].text != base.choices[0].text


@pytest.mark.parametrize("kwargs, error, needle", [
    (dict(model="gpt-4"), "NotFoundError", "is not served here"),
    (dict(model="rlhf-ray-policy:nope"), "NotFoundError", "is not served here"),
    (dict(max_tokens=999), "BadRequestError", "max_tokens: 999 exceeds this server's limit of 16"),
    (dict(temperature=-1), "BadRequestError", "temperature"),
    (dict(extra_body={"n": "three"}), "BadRequestError", "n:"),
])
def test_bad_requests_name_the_field(policy, kwargs, error, needle):
    import openai
    client, _ = policy
    with pytest.raises(getattr(openai, error)) as e:
        client.completions.create(**{"model": "rlhf-ray-policy", "prompt": "x", "max_tokens": 4, **kwargs})
    assert needle in str(e.value)


def test_malformed_json_is_a_400(policy):
    _, url = policy
    r = httpx.post(url + "/v1/completions", content=b"{bad", headers={"Authorization": f"Bearer {KEY}",
                                                                        "content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_api_key_required(policy, headers):
    _, url = policy
    r = httpx.post(url + "/v1/completions", json={"model": "rlhf-ray-policy", "prompt": "x"}, headers=headers)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    import openai
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


# `serve --what reward` is test_train_cli.py's overlapped run: an RL run scores through it, and its scores equal
# the reward model's own.
