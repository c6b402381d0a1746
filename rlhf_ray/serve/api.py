"""The HTTP pieces of our own: OpenAI-shaped errors that name the field, and the reward service.

Reward:  POST /score {"prompts": [...], "responses": [...]} -> {"scores": [...]}  (the `http` reward source)
The policy's OpenAI API is Ray Serve LLM's (see `ingress.py`); it reuses the error helpers here.
"""
from __future__ import annotations

import hmac
from typing import Awaitable, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel


OPEN_PATHS = ("/-/healthz", "/-/routes")  # Serve's own health probes stay reachable for load balancers


class ScoreRequest(BaseModel):
    prompts: list[str]
    responses: list[str]


def error_response(status: int, message: str, param: Optional[str] = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": status}})


def require_key(app: FastAPI, key: str) -> None:
    """A Bearer key on every path but Serve's health probes (Ray Serve LLM's ingress has none). Here, not in
    ingress.py, which imports Ray Serve LLM and with it vLLM: the key check is tested without them."""
    @app.middleware("http")
    async def _bearer(request: Request, call_next):
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), key.encode()):
            response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <serve.api_key>'",
                                      None, "authentication_error")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return await call_next(request)


def name_bad_fields(app: FastAPI) -> None:
    """Validation errors as OpenAI-shaped 400s naming the first bad field (FastAPI's default is a 422)."""
    @app.exception_handler(RequestValidationError)
    async def _bad_request(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return error_response(400, f"the request body is not valid JSON ({first['ctx'].get('error', '')} at "
                                       f"character {first['loc'][-1]})")
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        return error_response(400, f"{param}: {first['msg']}", param)


def reward_app(score: Callable[[list[str], list[str]], Awaitable[list[float]]]) -> FastAPI:
    """`score(prompts, responses)` is awaited per request; the deployment batches concurrent calls."""
    app = FastAPI(title="rlhf_ray reward", version="1")
    name_bad_fields(app)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/score")
    async def score_route(req: ScoreRequest):
        if len(req.prompts) != len(req.responses):
            return error_response(400, f"responses: prompts and responses differ in length ({len(req.prompts)} vs "
                                       f"{len(req.responses)})", "responses")
        return {"scores": await score(req.prompts, req.responses)}

    return app
