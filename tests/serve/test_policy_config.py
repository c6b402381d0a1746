"""What we hand Ray Serve LLM, checked without starting it: hardware, replicas, adapters, template, key."""
import json
import subprocess
import sys

import pytest

from rlhf_ray.config import ConfigError, ServeConfig, load_config
from rlhf_ray.models.kit import resolve_model_path
from rlhf_ray.serve.adapters import check_adapters
from rlhf_ray.models.chat import FALLBACK_TEMPLATE, serving_chat_template
from rlhf_ray.serve.policy import llm_config, resolve_api_key


@pytest.fixture(scope="module")
def tiny():
    return resolve_model_path("builtin:tiny")


def test_cpu_replica_says_cpu_and_sizes_the_engine(tiny):
    c = llm_config(tiny, ServeConfig(cpus_per_replica=2, kv_cache_gib=2), {}, "float32")
    assert c.accelerator_config.kind == "cpu" and c.placement_group_config["bundles"] == [{"CPU": 2}]
    env = c.runtime_env["env_vars"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["OMP_NUM_THREADS"] == "2"
    assert c.engine_kwargs["max_model_len"] == 256 and c.engine_kwargs["dtype"] == "float32"
    assert c.deployment_config == {"num_replicas": 1} and c.model_id == "rlhf-ray-policy"


def test_gpu_replica_and_autoscaling(tiny):
    c = llm_config(tiny, ServeConfig(gpus_per_replica=2, min_replicas=1, max_replicas=4, target_ongoing_requests=8,
                                     model_name="m"), {}, "bfloat16")
    assert c.accelerator_config.kind == "gpu" and c.engine_kwargs["tensor_parallel_size"] == 2
    assert c.placement_group_config["bundles"] == [{"CPU": 1, "GPU": 1}] * 2
    assert c.deployment_config["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4,
                                                         "target_ongoing_requests": 8}


def test_template_only_for_models_without_one(tiny, tmp_path):
    assert serving_chat_template(tiny, None) == FALLBACK_TEMPLATE  # the tiny tokenizer has none
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    assert serving_chat_template(str(tmp_path), None) is None
    assert serving_chat_template(str(tmp_path), "{{ mine }}") == "{{ mine }}"
    assert llm_config(tiny, ServeConfig(), {}, "float32").engine_kwargs["chat_template"] == FALLBACK_TEMPLATE


def test_adapters_enable_lora_with_their_rank(tiny, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"r": 32}))
    adapters = check_adapters({"a": str(tmp_path / "a")})
    c = llm_config(tiny, ServeConfig(adapters=adapters), adapters, "float32")
    assert c.engine_kwargs["enable_lora"] and c.engine_kwargs["max_lora_rank"] == 32
    assert c.experimental_configs["rlhf_ray_adapters"] == adapters
    with pytest.raises(ConfigError, match="serve.adapters.b: .* not a LoRA adapter folder"):
        check_adapters({"b": str(tmp_path)})


def test_api_key_required_off_loopback(monkeypatch):
    monkeypatch.delenv("RLHF_RAY_API_KEY", raising=False)
    assert resolve_api_key(ServeConfig()) is None
    with pytest.raises(ConfigError, match="serve.api_key"):
        resolve_api_key(ServeConfig(host="0.0.0.0"))
    assert resolve_api_key(ServeConfig(host="0.0.0.0", api_key="k")) == "k"
    monkeypatch.setenv("RLHF_RAY_API_KEY", "e")
    assert resolve_api_key(ServeConfig(host="0.0.0.0")) == "e"


@pytest.mark.parametrize("override, needle", [
    ("serve.max_replicas=0", "max_replicas"),
    ("serve.adapters={'a:b': /x}", "adapter name"),
])
def test_serve_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, ["serve.min_replicas=2", override] if "max_replicas" in override else [override])


def test_cli_refuses_an_open_host_without_a_key_before_ray(monkeypatch, capsys):
    from rlhf_ray.cli import main
    monkeypatch.delenv("RLHF_RAY_API_KEY", raising=False)
    monkeypatch.setattr("rlhf_ray.runtime.ray_session", lambda *a: pytest.fail("Ray must not start"))
    assert main(["serve", "serve.host=0.0.0.0", "serve.model=builtin:tiny"]) == 2
    assert "serve.api_key" in capsys.readouterr().err


def test_the_serve_checks_before_ray_import_neither_ray_serve_llm_nor_vllm():
    """The CLI names a bad adapter folder or API key before Ray starts; the pieces it checks with (and the key
    check the fast tier tests) must not pull in Ray Serve LLM, which imports vLLM: 8-14 CPU-seconds."""
    code = ("import sys, rlhf_ray.serve.adapters, rlhf_ray.serve.api, rlhf_ray.serve.policy; "
            "bad = [m for m in ('vllm', 'ray.llm') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
