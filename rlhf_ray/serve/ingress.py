"""The OpenAI ingress in front of Ray Serve LLM, with what ours adds to it.

Ray Serve LLM's `OpenAiIngress` routes, streams (SSE) and batches; this subclass adds:
- 404 naming the models this server serves (the base name and `base:adapter` for each adapter), and
  adapters listed by GET /v1/models;
- a config-driven ceiling on `max_tokens` (400 naming the field), which is also chat's default;
- 400s naming the bad field for malformed requests (Ray's handler names the bad *value*);
- an optional Bearer key (Ray Serve LLM has none), checked before anything else (`api.require_key`).
"""
from __future__ import annotations

from typing import Optional

from fastapi import Request
from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard, ModelList, OpenAIHTTPException
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, init, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from rlhf_ray.serve.api import name_bad_fields, require_key


class PolicyIngress(OpenAiIngress):
    def __init__(self, llm_deployments, model_cards, lora_paths=None, *, max_tokens: int,
                 adapters: tuple[str, ...] = (), **kwargs):
        super().__init__(llm_deployments, model_cards, lora_paths=None, **kwargs)  # adapters: ours, not cloud
        self._max_tokens = max_tokens
        [(self._base, self._base_card)] = model_cards.items()
        self._served = [self._base] + [f"{self._base}:{a}" for a in adapters]

    async def _get_model_id(self, model: Optional[str]) -> str:
        if model is not None and model not in self._served:
            raise OpenAIHTTPException(404, f"model: {model!r} is not served here; this server serves "
                                           + ", ".join(repr(m) for m in self._served), type="NotFoundError")
        return model or self._base

    async def model(self, model_id: str) -> Optional[ModelCard]:
        if model_id not in self._served:
            return None
        return self._base_card.model_copy(update={"id": model_id})

    async def models(self) -> ModelList:
        return ModelList(data=[await self.model(m) for m in self._served])

    def _limit(self, asked: Optional[int]) -> None:
        if asked is not None and asked > self._max_tokens:
            raise OpenAIHTTPException(400, f"max_tokens: {asked} exceeds this server's limit of {self._max_tokens}",
                                      type="BadRequestError")

    async def completions(self, body: CompletionRequest, request: Request):
        self._limit(body.max_tokens)
        return await super().completions(body, request)

    async def chat(self, body: ChatCompletionRequest, request: Request):
        self._limit(body.max_completion_tokens)
        self._limit(body.max_tokens)
        if body.max_completion_tokens is None and body.max_tokens is None:
            body.max_tokens = self._max_tokens  # vLLM's default is the whole remaining context
        return await super().chat(body, request)


def policy_ingress_cls(api_key: Optional[str]):
    """The ingress class for `serve.deployment`, its FastAPI app carrying the key check and field-naming 400s."""
    app = init()
    name_bad_fields(app)
    if api_key:
        require_key(app, api_key)
    return make_fastapi_ingress(PolicyIngress, app=app)

