"""The finished policy on Ray Serve LLM: vLLM with continuous batching behind an OpenAI-compatible API.

One engine deployment (Ray Serve LLM's `LLMServer` as `server.PolicyServer`; autoscaled between serve.min_replicas
and serve.max_replicas) and one ingress deployment (ours, `ingress.PolicyIngress`). Adapters in serve.adapters ride
on the base model as `serve.model_name:ADAPTER` (see `adapters.py`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from rlhf_ray.config import ConfigError, ServeConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "RLHF_RAY_API_KEY"


def resolve_api_key(cfg: ServeConfig) -> Optional[str]:
    """serve.api_key, else $RLHF_RAY_API_KEY; an open server on a non-loopback host is refused before start."""
    key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    if key is None and cfg.host not in LOOPBACK:
        raise ConfigError(f"serve.host={cfg.host} exposes the server beyond this machine: set serve.api_key "
                          f"(or ${API_KEY_ENV}) so that clients must send 'Authorization: Bearer <key>'")
    return key


def _context_len(model_path: str, cfg: ServeConfig) -> int:
    if cfg.max_model_len:
        return cfg.max_model_len
    hf = json.loads((Path(model_path) / "config.json").read_text())
    return min(int(hf.get("max_position_embeddings", 2048)), 4096)


def _replicas(cfg: ServeConfig) -> dict[str, Any]:
    if cfg.max_replicas == cfg.min_replicas:
        return {"num_replicas": cfg.min_replicas}
    # Ray's default target is effectively unbounded for LLM servers: without one a replica never looks busy.
    return {"autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                   "target_ongoing_requests": cfg.target_ongoing_requests}}


def _hardware(cfg: ServeConfig) -> dict[str, Any]:
    """GPU replicas: one bundle per GPU (tensor parallel). CPU replicas: say so explicitly, or Ray Serve LLM
    asks for a GPU; the engine's threads and KV cache come from the same env the RL generator uses."""
    if cfg.gpus_per_replica:
        return {"accelerator_config": {"kind": "gpu"},
                "placement_group_config": {"bundles": [{"CPU": 1, "GPU": 1}] * cfg.gpus_per_replica}}
    from rlhf_ray.config import RolloutConfig
    from rlhf_ray.roles.generator.threads import engine_env
    env = engine_env(RolloutConfig(cpus_per_engine=cfg.cpus_per_replica, kv_cache_gib=cfg.kv_cache_gib))
    return {"accelerator_config": {"kind": "cpu"},
            "placement_group_config": {"bundles": [{"CPU": cfg.cpus_per_replica}]}, "env": env}


def llm_config(model_path: str, cfg: ServeConfig, adapters: dict[str, str], dtype: str):
    from ray.serve.llm import LLMConfig

    from rlhf_ray.runtime import role_env
    from rlhf_ray.serve.adapters import ADAPTERS_KEY, max_lora_rank
    from rlhf_ray.serve.server import PolicyServer
    from rlhf_ray.models.chat import serving_chat_template

    hw = _hardware(cfg)
    engine: dict[str, Any] = dict(dtype=dtype, max_model_len=_context_len(model_path, cfg),
                                  tensor_parallel_size=max(cfg.gpus_per_replica, 1))
    if not cfg.gpus_per_replica:
        # On CPU this fraction is of host memory; the KV cache is sized by VLLM_CPU_KVCACHE_SPACE instead.
        engine.update(gpu_memory_utilization=0.1, enforce_eager=True)
    if (template := serving_chat_template(model_path, cfg.chat_template)) is not None:
        engine["chat_template"] = template
    extra: dict[str, Any] = {}
    if adapters:
        engine.update(enable_lora=True, max_loras=min(len(adapters), 8), max_lora_rank=max_lora_rank(adapters))
        extra = dict(lora_config={"max_num_adapters_per_replica": min(len(adapters), 8)},
                     experimental_configs={ADAPTERS_KEY: adapters})
    return LLMConfig(model_loading_config={"model_id": cfg.model_name, "model_source": model_path},
                     accelerator_config=hw["accelerator_config"], placement_group_config=hw["placement_group_config"],
                     engine_kwargs=engine, deployment_config=_replicas(cfg),
                     runtime_env={"env_vars": {**role_env(), **hw.get("env", {})}}, server_cls=PolicyServer,
                     **extra)


def policy_application(model_path: str, cfg: ServeConfig, dtype: str = "float32"):
    """The Serve application; validate (api key, adapters) before anything starts."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.server.builder import build_llm_deployment

    from rlhf_ray.serve.adapter_loader import LocalLoraLoader
    from rlhf_ray.serve.adapters import check_adapters
    from rlhf_ray.serve.ingress import PolicyIngress, policy_ingress_cls

    key = resolve_api_key(cfg)
    adapters = check_adapters(cfg.adapters)
    config = llm_config(model_path, cfg, adapters, dtype)
    server = build_llm_deployment(config, bind_kwargs={"model_downloader": LocalLoraLoader} if adapters else None)
    options = PolicyIngress.get_deployment_options([config])
    options["autoscaling_config"].update(min_replicas=1, max_replicas=max(cfg.max_replicas, 1))
    return serve.deployment(policy_ingress_cls(key), name="OpenAiIngress", **options).bind(
        llm_deployments={cfg.model_name: server},
        model_cards={cfg.model_name: to_model_metadata(cfg.model_name, config)},
        max_tokens=cfg.max_tokens, adapters=tuple(adapters))
