"""A SERVER span per request that continues the caller's trace (W3C `traceparent`).

Added to the app only when the OpenTelemetry API is installed. The run span of the request's
pipeline starts inside it, so a client's trace shows the whole MoA run under its own call.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import propagate, trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moa._version import __version__

__all__ = ["TraceMiddleware"]

# Span names must not carry a model name from the URL: fixed routes only, else the method.
_ROUTES = ("/healthz", "/metrics", "/v1/models", "/v1/chat/completions")
_tracer = trace.get_tracer("moa.server", __version__)


class TraceMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        path: str = scope["path"]
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with _tracer.start_as_current_span(
            f"{method} {path}" if path in _ROUTES else method,
            context=propagate.extract(carrier),
            kind=trace.SpanKind.SERVER,
            record_exception=True,
        ) as span:
            if not span.is_recording():
                await self.app(scope, receive, send)
                return
            span.set_attributes(
                {"http.request.method": method, "url.path": path, "url.scheme": scope["scheme"]}
            )

            async def send_noting_status(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status: Any = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(trace.Status(trace.StatusCode.ERROR))
                await send(message)

            await self.app(scope, receive, send_noting_status)
