"""`moa serve --metrics`: Prometheus metrics at /metrics (the [metrics] extra).

    moa_requests_total{pipeline,status}              chat completion requests by HTTP status
    moa_runs_total{pipeline,outcome}                 runs: ok, failed, cancelled
    moa_run_duration_seconds{pipeline}               histogram, runs that ended with a result
    moa_time_to_first_token_seconds{pipeline}        histogram
    moa_upstream_calls_total{provider,model,outcome} agent calls by status (ok, failed, …)
    moa_tokens_total{pipeline,kind}                  prompt / completion tokens
    moa_cost_usd_total{pipeline}                     from the config's prices, where given
    moa_runs_in_flight{pipeline}                     gauge

Each app has its own registry, so several servers in one process do not mix their counts.
Labels only take values from the config (pipeline, provider and model names), never from a
request, so a client cannot grow the number of series.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Iterable
from typing import Any

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
except ImportError:
    from moa.errors import MissingExtraError

    raise MissingExtraError("moa serve --metrics", "metrics", "prometheus-client") from None

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moa.engine import MoA, Prompt
from moa.errors import RunError
from moa.pricing import run_cost
from moa.results import AgentFinished, Done, Event, RunResult

__all__ = ["PIPELINE_KEY", "MetricsMiddleware", "ServerMetrics"]

#: Where the chat route leaves the pipeline's name for MetricsMiddleware (in scope["state"]).
PIPELINE_KEY = "moa_pipeline"
_CHAT = "/v1/chat/completions"
# MoA runs take seconds to minutes; the default buckets stop at 10 s.
_RUN_BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)


class ServerMetrics:
    def __init__(self, pipelines: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "moa_requests", "Chat completion requests by HTTP status.", ["pipeline", "status"],
            registry=r,
        )  # fmt: skip
        self.runs = Counter("moa_runs", "Runs by outcome.", ["pipeline", "outcome"], registry=r)
        self.duration = Histogram(
            "moa_run_duration_seconds", "Run latency, end to end.", ["pipeline"],
            buckets=_RUN_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "moa_time_to_first_token_seconds", "Time to the answer's first token.", ["pipeline"],
            buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream = Counter(
            "moa_upstream_calls", "Agent calls to upstream models by outcome.",
            ["provider", "model", "outcome"], registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "moa_tokens", "Tokens spent upstream.", ["pipeline", "kind"], registry=r
        )
        self.cost = Counter(
            "moa_cost_usd", "Cost of runs in US dollars (priced calls only).", ["pipeline"],
            registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("moa_runs_in_flight", "Runs going on.", ["pipeline"], registry=r)
        for name in pipelines:  # every pipeline's gauge shows from the start, at 0
            self.in_flight.labels(name)

    def observed(self, moa: MoA) -> MoA:
        """The same pipeline, counting what its runs do."""
        return _ObservedMoA(moa, self)

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def _ended(self, moa: MoA, result: RunResult) -> None:
        name = moa.name
        self.duration.labels(name).observe(result.latency_s)
        if result.ttft_s is not None:
            self.ttft.labels(name).observe(result.ttft_s)
        usage = result.usage
        self.tokens.labels(name, "prompt").inc(usage.prompt_tokens)
        self.tokens.labels(name, "completion").inc(usage.completion_tokens)
        cost = run_cost(moa.provider_configs, result)
        if cost.known:
            self.cost.labels(name).inc(cost.usd)


class _ObservedMoA(MoA):
    def __init__(self, moa: MoA, metrics: ServerMetrics) -> None:
        super().__init__(
            moa.pipeline,
            moa.providers,
            name=moa.name,
            owns_providers=False,
            provider_configs=moa.provider_configs,
        )
        self._metrics = metrics

    async def stream(
        self, prompt: Prompt, *args: Any, **kwargs: Any
    ) -> AsyncGenerator[Event, None]:
        metrics, name = self._metrics, self.name
        metrics.in_flight.labels(name).inc()
        outcome = "cancelled"
        try:
            async with contextlib.aclosing(super().stream(prompt, *args, **kwargs)) as events:
                async for event in events:
                    if isinstance(event, AgentFinished):
                        result = event.result
                        metrics.upstream.labels(result.provider, result.model, result.status).inc()
                    elif isinstance(event, Done):
                        outcome = "ok"
                        metrics._ended(self, event.result)
                    yield event
        except RunError as error:
            outcome = "failed"
            if error.result is not None:
                metrics._ended(self, error.result)
            raise
        finally:
            metrics.in_flight.labels(name).dec()
            metrics.runs.labels(name, outcome).inc()


class MetricsMiddleware:
    """Counts chat completion requests by pipeline (when the route got that far) and status."""

    def __init__(self, app: ASGIApp, *, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != _CHAT:
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app raises before answering

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            pipeline = scope.get("state", {}).get(PIPELINE_KEY, "")
            self.metrics.requests.labels(pipeline, str(status)).inc()
