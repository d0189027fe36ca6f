"""The OpenAI-compatible HTTP API over MoA pipelines: a Starlette app, served by uvicorn.

    GET  /healthz               200 {"status": "ok"}; 503 while draining (no key needed)
    GET  /v1/models             each pipeline is a model
    GET  /v1/models/{model}
    POST /v1/chat/completions   OpenAI's request; the answer streamed (SSE) or not
    POST /v1/moa/runs           the same request; every agent's events streamed (SSE)
    GET  /                      the web page (unless ui=False), assets under /ui/
    GET  /metrics               Prometheus metrics, with metrics=True (the /v1 key unless public)
    POST /v1/responses          the Responses API, text in and out (moa.server.responses)
    POST /v1/completions        legacy completions of one prompt (moa.server.completions)

The app owns the pipelines it is given: their providers are closed when it shuts down.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from moa import tracing
from moa.engine import MoA, close_providers
from moa.errors import ClientGone
from moa.server.chat import ChatRun
from moa.server.completions import CompletionRun
from moa.server.connections import DEFAULT_BODY_TIMEOUT_S
from moa.server.cors import cors_middleware
from moa.server.errors import ApiError, error_response, internal_error, json_response
from moa.server.events import EventRun
from moa.server.guards import (
    ApiKeys,
    GuardMiddleware,
    RunSlots,
    read_body,
)
from moa.server.responses import ResponsesRun
from moa.server.schema import parse_request
from moa.server.ui import ui_routes

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONCURRENCY",
    "ServerState",
    "create_app",
    "server_state",
]

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_MAX_CONCURRENCY = 64
DEFAULT_HEARTBEAT_S = 15.0


@dataclass
class ServerState:
    """Everything the routes share."""

    pipelines: dict[str, MoA]
    keys: ApiKeys
    slots: RunSlots
    max_body_bytes: int
    heartbeat_s: float
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT_S
    #: No new requests: SIGTERM came (see moa.server.runner).
    draining: bool = False
    started: int = field(default_factory=lambda: int(time.time()))
    #: moa.server.metrics.ServerMetrics with metrics=True.
    metrics: Any = None

    def pipeline(self, model: str) -> MoA:
        moa = self.pipelines.get(model)
        if moa is None:
            raise ApiError(
                404,
                f"the model {model!r} does not exist on this server; it serves: "
                f"{', '.join(self.pipelines)}",
                param="model",
                code="model_not_found",
            )
        return moa


def create_app(
    pipelines: Mapping[str, MoA],
    *,
    api_keys: Iterable[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    close_on_shutdown: bool = True,
    ui: bool = True,
    metrics: bool = False,
    metrics_public: bool = False,
    cors_origins: Iterable[str] = (),
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT_S,
) -> Starlette:
    """An ASGI app serving each pipeline as a model named by its key in `pipelines`.

    With `api_keys`, every /v1 route needs `Authorization: Bearer <key>`. At most
    `max_concurrency` runs go at once (more get 429); bodies over `max_body_bytes` get 413.
    `ui` serves the web page at `/`.
    With `metrics`, GET /metrics serves Prometheus metrics, behind the same keys unless
    `metrics_public`.
    Browser pages from `cors_origins` may call the API (see moa.server.cors).
    """
    if not pipelines:
        raise ValueError("create_app needs at least one pipeline")
    if max_body_bytes < 1:
        raise ValueError("max_body_bytes must be at least 1")
    state = ServerState(
        pipelines=dict(pipelines),
        keys=ApiKeys(api_keys),
        slots=RunSlots(max_concurrency),
        max_body_bytes=max_body_bytes,
        heartbeat_s=heartbeat_s,
        body_timeout=body_timeout,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if close_on_shutdown:
            await close_providers(state.pipelines)

    routes = [
        Route("/healthz", _health, methods=["GET"]),
        Route("/v1/models", _list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", _get_model, methods=["GET"]),
        _run_route("/v1/chat/completions", ChatRun),
        _run_route("/v1/moa/runs", EventRun),
        _run_route("/v1/responses", ResponsesRun),
        _run_route("/v1/completions", CompletionRun),
        *(ui_routes() if ui else []),
    ]
    middleware = [
        Middleware(
            GuardMiddleware,
            state=state,
            protect=() if metrics_public else ("/metrics",),
        )
    ]
    if metrics:
        from moa.server.metrics import MetricsMiddleware, ServerMetrics

        state.metrics = ServerMetrics(state.pipelines)
        routes.append(Route("/metrics", state.metrics.endpoint, methods=["GET"]))
        middleware.insert(0, Middleware(MetricsMiddleware, metrics=state.metrics))
    if tracing.available():
        from moa.server.tracing import TraceMiddleware

        middleware.insert(0, Middleware(TraceMiddleware))
    # Outermost, so that refusals (401, 503) carry CORS headers a browser can read.
    middleware[:0] = cors_middleware(cors_origins)
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            ApiError: _api_error,
            ClientGone: _client_gone,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    app.state.moa = state
    return app


def server_state(app: Starlette) -> ServerState:
    state: ServerState = app.state.moa
    return state


# --- routes -----------------------------------------------------------------------------


async def _health(request: Request) -> Response:
    # Says nothing about the pipelines: it answers without a key.
    if server_state(request.app).draining:
        return json_response({"status": "draining"}, 503)
    return json_response({"status": "ok"})


async def _list_models(request: Request) -> Response:
    state = server_state(request.app)
    return json_response({"object": "list", "data": [_model(state, n) for n in state.pipelines]})


async def _get_model(request: Request) -> Response:
    state = server_state(request.app)
    name = request.path_params["model"]
    state.pipeline(name)
    return json_response(_model(state, name))


def _model(state: ServerState, name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": state.started, "owned_by": "moa"}


def _run_route(path: str, run: type[ChatRun]) -> Route:
    """A POST route that checks the request (`run.request_type`) and answers with a `run`."""

    async def endpoint(request: Request) -> ChatRun:
        state = server_state(request.app)
        body = await read_body(
            request.scope, request.receive, state.max_body_bytes, state.body_timeout
        )
        parsed, messages = parse_request(body, run.request_type)
        moa = state.pipeline(parsed.model).with_answer_settings(parsed.answer_settings())
        if state.metrics is not None:
            request.state.moa_pipeline = moa.name  # read by MetricsMiddleware
            moa = state.metrics.observed(moa)
        slot = state.slots.take()
        # No await from here on: the slot is released by the run, which starts right away.
        return run(moa, messages, parsed, slot, heartbeat_s=state.heartbeat_s)

    return Route(path, endpoint, methods=["POST"])


# --- errors -----------------------------------------------------------------------------


async def _api_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ApiError)
    return error_response(error)


async def _client_gone(request: Request, error: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it; the access log shows what happened


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    if error.status_code == 404:
        message = (
            f"no route {request.method} {request.url.path}: this server serves GET /v1/models "
            "and POST /v1/chat/completions, /v1/responses and /v1/completions"
        )
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(error.detail)
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    return error_response(ApiError(error.status_code, message, code=code, headers=error.headers))


async def _internal_error(request: Request, error: Exception) -> Response:
    # Starlette logs the traceback after this answer is sent.
    return error_response(internal_error())
