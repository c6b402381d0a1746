"""Ray Serve deployments: the finished policy behind an OpenAI-compatible API, and a reward model as the
HTTP reward service that `reward.sources: [{kind: http}]` calls during training.

The policy runs on the same `GeneratorEngine` as RL rollouts: one vLLM integration to keep working
across vLLM upgrades, not two.
"""
from __future__ import annotations

import threading
from typing import Optional

from rlhf_ray.config import RolloutConfig, ServeConfig
from rlhf_ray.utils.device import Backend


class EnginePolicyBackend:
    """`PolicyBackend` over a `GeneratorEngine`; one request at a time per replica (vLLM's LLM is not thread-safe)."""

    def __init__(self, model_path: str, serve_cfg: ServeConfig, backend: Backend, cpus: float):
        from rlhf_ray.generator.engine import GeneratorEngine
        from transformers import AutoConfig
        rollout = RolloutConfig(cpus_per_engine=cpus, n_samples_per_prompt=1, seed=0)
        positions = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", 2048)
        self.max_model_len = min(positions, 4096)
        self.engine = GeneratorEngine(model_path, rollout, backend, lora=False, max_model_len=self.max_model_len)
        self.tokenizer = self.engine.tokenizer
        self.model_name, self.max_tokens = serve_cfg.model_name, serve_cfg.max_tokens
        self._lock = threading.Lock()

    def complete(self, prompts, *, n, max_tokens, temperature, top_p, stop, seed: Optional[int]):
        for i, p in enumerate(prompts):
            length = len(self.tokenizer(p).input_ids)
            if length + max_tokens > self.max_model_len:
                raise ValueError(f"prompt {i} has {length} tokens; with max_tokens={max_tokens} that exceeds the "
                                 f"model's context of {self.max_model_len} tokens")
        with self._lock:
            r = self.engine.generate(prompts, n, temperature=temperature, top_p=top_p, max_new_tokens=max_tokens,
                                     stop=stop, seeds=[seed] * len(prompts))
        out = [([], 0) for _ in prompts]
        for b, i in enumerate(r.prompt_index):
            outs, _ = out[i]
            outs.append((r.texts[b], r.finish_reasons[b], len(r.response_ids[b])))
            out[i] = (outs, len(r.prompt_ids[b]))
        return out

    def chat_prompt(self, messages: list[dict]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n".join(m["content"] for m in messages)


def policy_application(model_path: str, serve_cfg: ServeConfig, backend: Backend, cpus: float = 1.0):
    from ray import serve

    def build():
        from rlhf_ray.serve.api import policy_app
        return policy_app(EnginePolicyBackend(model_path, serve_cfg, backend, cpus))

    deployment = serve.deployment(serve.ingress(build)(), name="policy", num_replicas=serve_cfg.num_replicas,
                                  ray_actor_options={"num_cpus": cpus, "num_gpus": 1 if backend.device == "cuda" else 0})
    return deployment.bind()


def reward_application(reward_cfg, resolve_path, device: str = "cpu", cpus: float = 1.0):
    from ray import serve

    def build():
        from rlhf_ray.scoring.reward import RewardScorer
        from rlhf_ray.serve.api import reward_app
        scorer = RewardScorer(reward_cfg, resolve_path=resolve_path, device=device)
        return reward_app(scorer.score)

    deployment = serve.deployment(serve.ingress(build)(), name="reward", ray_actor_options={"num_cpus": cpus})
    return deployment.bind()
