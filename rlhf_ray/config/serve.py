"""The `serve` section: what `rlhf-ray serve` reads to put a finished policy behind Ray Serve; no training
stage reads it (a section of the one config tree, `rlhf_ray.config.schema.Config`, so one file holds a run)."""
from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from rlhf_ray.config.section import Section


class ServeConfig(Section):
    """`rlhf-ray serve`: the policy on Ray Serve LLM (OpenAI API) and the reward service."""

    model: Optional[str] = Field(None, description="policy folder to serve; default: this run's final policy")
    model_name: str = Field("rlhf-ray-policy", description="the `model` clients send; adapters are NAME:ADAPTER")
    host: str = Field("127.0.0.1", description="a host other than loopback requires api_key")
    port: int = Field(8000, gt=0, lt=65536)
    api_key: Optional[str] = Field(None, description="Bearer key clients must send; or env RLHF_RAY_API_KEY")
    max_tokens: int = Field(256, gt=0, description="largest max_tokens a request may ask for (and chat's default)")
    max_model_len: Optional[int] = Field(None, gt=0, description="context length; default: the model's, <= 4096")
    chat_template: Optional[str] = Field(None, description="Jinja template (or a file) for models without one")
    adapters: dict[str, str] = Field(default_factory=dict,
                                     description="LoRA adapters served by name on the base: {name: adapter folder}")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, gt=0, description="> min_replicas: autoscale between them")
    target_ongoing_requests: float = Field(16, gt=0, description="per replica, for autoscaling")
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: int = Field(0, ge=0, description="0: a CPU-only replica (vLLM's CPU backend)")
    kv_cache_gib: float = Field(1.0, gt=0, description="CPU replicas: vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE)")
    reward_gpus: float = Field(0.0, ge=0, description="GPUs for the reward service's replica")
    reward_max_batch_size: int = Field(32, gt=0, description="reward requests scored together in one call")
    reward_batch_wait_s: float = Field(0.01, ge=0, description="how long a reward batch waits to fill")

    @model_validator(mode="after")
    def _replicas(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"serve.max_replicas ({self.max_replicas}) must be >= serve.min_replicas "
                             f"({self.min_replicas})")
        for name in self.adapters:
            if not name or ":" in name or "/" in name:
                raise ValueError(f"serve.adapters: adapter name {name!r} must be non-empty, without ':' or '/'")
        return self
