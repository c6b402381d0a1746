"""The HTTP surface, as plain FastAPI: an OpenAI-compatible policy API and the reward service.

Policy:  GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health
Reward:  POST /score {"prompts": [...], "responses": [...]} -> {"scores": [...]}  (the `http` reward source)
Requests are validated by pydantic; a bad request gets a 400 in OpenAI's error shape naming the field.
The app is built around a `backend` object, so tests can drive it without Ray Serve or vLLM.
"""
from __future__ import annotations

import time
import uuid
from typing import Optional, Protocol, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=64)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    max_tokens: int = Field(16, ge=1)


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, description="default: the server's limit")


class ScoreRequest(BaseModel):
    prompts: list[str]
    responses: list[str]


class PolicyBackend(Protocol):
    """`complete` returns, per prompt, its n outputs as (text, finish_reason, n_tokens) and its token count."""

    model_name: str
    max_tokens: int

    def complete(self, prompts: list[str], *, n: int, max_tokens: int, temperature: float, top_p: float,
                 stop: list[str], seed: Optional[int]) -> list[tuple[list[tuple[str, str, int]], int]]: ...

    def chat_prompt(self, messages: list[dict]) -> str: ...


def _error(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error",
                                                               "param": param, "code": None}})


def _name_bad_fields(app: FastAPI) -> None:
    """Validation errors as OpenAI-shaped 400s naming the first bad field (FastAPI's default is a 422)."""
    @app.exception_handler(RequestValidationError)
    async def _bad_request(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        return _error(400, f"{param}: {first['msg']}", param)


def _stops(stop) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


def policy_app(backend: PolicyBackend) -> FastAPI:
    app = FastAPI(title="rlhf_ray policy", version="1")

    _name_bad_fields(app)

    def _check(req) -> Optional[JSONResponse]:
        if req.model and req.model != backend.model_name:
            return _error(404, f"model {req.model!r} is not served here; this server serves {backend.model_name!r}",
                          "model")
        if req.max_tokens is not None and req.max_tokens > backend.max_tokens:
            return _error(400, f"max_tokens: {req.max_tokens} exceeds this server's limit of {backend.max_tokens}",
                          "max_tokens")
        return None

    @app.get("/health")
    def health():
        return {"status": "ok", "model": backend.model_name}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": backend.model_name, "object": "model", "owned_by": "rlhf_ray"}]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        if (bad := _check(req)) is not None:
            return bad
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            return _error(400, "prompt: must not be empty", "prompt")
        try:
            results = backend.complete(prompts, n=req.n, max_tokens=req.max_tokens, temperature=req.temperature,
                                       top_p=req.top_p, stop=_stops(req.stop), seed=req.seed)
        except ValueError as e:  # the backend's word on a request it cannot serve (e.g. too long)
            return _error(400, str(e), "prompt")
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, (outs, n_prompt) in enumerate(results):
            prompt_tokens += n_prompt
            for j, (text, finish, n_tok) in enumerate(outs):
                completion_tokens += n_tok
                choices.append({"index": i * req.n + j, "text": text, "finish_reason": finish, "logprobs": None})
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": backend.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        if (bad := _check(req)) is not None:
            return bad
        prompt = backend.chat_prompt([m.model_dump() for m in req.messages])
        try:
            [(outs, n_prompt)] = backend.complete([prompt], n=req.n, max_tokens=req.max_tokens or backend.max_tokens,
                                                  temperature=req.temperature, top_p=req.top_p,
                                                  stop=_stops(req.stop), seed=req.seed)
        except ValueError as e:
            return _error(400, str(e), "messages")
        choices = [{"index": j, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                   for j, (text, finish, _) in enumerate(outs)]
        n_out = sum(o[2] for o in outs)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": backend.model_name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}

    return app


def reward_app(score_fn) -> FastAPI:
    """`score_fn(prompts, responses) -> (scores, stats)`, e.g. `RewardScorer.score`."""
    app = FastAPI(title="rlhf_ray reward", version="1")

    _name_bad_fields(app)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/score")
    def score(req: ScoreRequest):
        if len(req.prompts) != len(req.responses):
            return _error(400, f"prompts and responses differ in length ({len(req.prompts)} vs "
                               f"{len(req.responses)})", "responses")
        scores, _ = score_fn(req.prompts, req.responses)
        return {"scores": scores}

    return app
