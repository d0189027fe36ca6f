"""OpenTelemetry spans for runs, layers and agent calls (the [otel] extra).

    moa.run <pipeline>              one per run         moa.pipeline, usage, cost, ttft, ok
    ├── moa.layer <n>               one per proposer layer: agents, ok count, min_ok
    │   └── chat <model>            one per agent call  GenAI attributes, moa.* status, attempts
    └── chat <model>                the aggregator (and each fallback tried)

Spans go through the OpenTelemetry *API* only: with no SDK configured every hook is a
non-recording span and costs next to nothing, and without `opentelemetry-api` installed this
module imports nothing from it and every hook is a no-op. Attributes follow the GenAI semantic
conventions where they exist (`gen_ai.*`, `server.address`, `error.type`); ours are `moa.*`.
Retries (`moa.retry`), references shrunk to fit (`moa.references_shrunk`), hedged requests
(`moa.hedge`) and agents cut off at a layer's deadline or as stragglers (`moa.agent.cut_off`,
on the layer span) are span events.

Prompt and answer text are recorded only when asked for: `capture_content(True)`, or the
environment variable OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true (the name the
OpenTelemetry GenAI instrumentations use). API keys never are: no header or key is read here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from moa._version import __version__
from moa.errors import RunError
from moa.results import AgentResult, Done, Event, RunResult, Usage

if TYPE_CHECKING:
    from moa.calls import AgentCall
    from moa.config import Layer, Pipeline, ProviderConfig
    from moa.pricing import Cost
    from moa.providers.base import ChatRequest, Completion

try:
    from opentelemetry import trace as _trace
except ImportError:  # the [otel] extra is not installed: every hook below is a no-op
    _trace = None  # type: ignore[assignment]

__all__ = [
    "CAPTURE_CONTENT_ENV",
    "add_event",
    "available",
    "capture_content",
    "layer_done",
    "layer_span",
    "note_request",
    "note_response",
    "traced_call",
    "traced_run",
]

CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"

# A ProxyTracer: it follows whatever TracerProvider is set later, so getting it once is enough.
_tracer: Any = None if _trace is None else _trace.get_tracer("moa", __version__)
_capture: bool | None = None


def available() -> bool:
    """Whether the OpenTelemetry API is installed (spans are recorded only if an SDK listens)."""
    return _trace is not None


def capture_content(enabled: bool | None) -> None:
    """Record prompts and answers on agent spans (True), never (False), or as the environment
    variable OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT says (None, the default)."""
    global _capture
    _capture = enabled


def _capturing() -> bool:
    if _capture is not None:
        return _capture
    return os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() in ("1", "true", "yes")


def _listening() -> bool:
    """Whether an SDK (any real TracerProvider) is installed: without one no span records, so
    the hooks skip even the API's no-op spans."""
    if _trace is None:
        return False
    provider = _trace.get_tracer_provider()
    return not isinstance(provider, _trace.ProxyTracerProvider | _trace.NoOpTracerProvider)


def _current() -> Any:
    """The current span if it records, else None (cheap: no attributes get built)."""
    if _trace is None:
        return None
    span = _trace.get_current_span()
    return span if span.is_recording() else None


@contextlib.contextmanager
def _span(name: str, kind: Any = None) -> Iterator[Any]:
    """A current span, or None when nobody records; errors are set by the callers."""
    if not _listening():
        yield None
        return
    with _tracer.start_as_current_span(
        name,
        kind=kind if kind is not None else _trace.SpanKind.INTERNAL,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span if span.is_recording() else None


def _fail(span: Any, error: BaseException, description: str | None = None) -> None:
    span.set_attribute("error.type", type(error).__qualname__)
    span.set_status(_trace.Status(_trace.StatusCode.ERROR, description or str(error)))


# --- run ---------------------------------------------------------------------------------


async def traced_run(
    name: str,
    pipeline: Pipeline,
    providers: Mapping[str, ProviderConfig],
    run: Callable[[Callable[[Event], None]], Awaitable[None]],
    emit: Callable[[Event], None],
) -> None:
    """`run(emit)` inside a run span; the span learns the result from the Done event."""
    with _span(f"moa.run {name}") as span:
        if span is None:
            await run(emit)
            return
        span.set_attributes(
            {
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": name,
                "moa.pipeline": name,
                "moa.layers": len(pipeline.layers),
                "moa.calls": pipeline.call_count,
            }
        )

        def observe(event: Event) -> None:
            if isinstance(event, Done):
                _record_run(span, providers, event.result)
            emit(event)

        try:
            await run(observe)
        except RunError as error:
            if error.result is not None:
                _record_run(span, providers, error.result)
            _fail(span, error)
            raise
        except BaseException as error:
            span.set_attribute("moa.status", "cancelled" if _cancelled(error) else "error")
            if not _cancelled(error):
                _fail(span, error)
            raise


def _record_run(span: Any, providers: Mapping[str, ProviderConfig], result: RunResult) -> None:
    from moa.pricing import run_cost

    span.set_attribute("moa.status", "ok" if result.ok else "failed")
    if result.ttft_s is not None:
        span.set_attribute("moa.ttft_s", result.ttft_s)
    span.set_attributes(
        _outcome(result.usage, result.latency_s, run_cost(providers, result), result.output)
    )


def _outcome(usage: Usage, latency_s: float, cost: Cost, output: str) -> dict[str, Any]:
    """What a run and an agent call both record: tokens, time, cost, and (if captured) text."""
    attributes: dict[str, Any] = {
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
        "moa.latency_s": latency_s,
    }
    if cost.known:
        attributes["moa.cost_usd"] = cost.usd
    if _capturing() and output:
        attributes["gen_ai.output.messages"] = _messages_json(
            [{"role": "assistant", "content": output}]
        )
    return attributes


def _cancelled(error: BaseException) -> bool:
    return isinstance(error, asyncio.CancelledError | GeneratorExit)


# --- layer -------------------------------------------------------------------------------


@contextlib.contextmanager
def layer_span(number: int, layer: Layer) -> Iterator[None]:
    """A proposer layer; a LayerFailed leaving it marks the span as an error."""
    with _span(f"moa.layer {number}") as span:
        if span is None:
            yield
            return
        span.set_attributes(
            {"moa.layer": number, "moa.layer.agents": len(layer.agents), "moa.min_ok": layer.min_ok}
        )
        try:
            yield
        except RunError as error:
            _fail(span, error)
            raise


def layer_done(results: Sequence[AgentResult]) -> None:
    span = _current()
    if span is not None:
        span.set_attribute("moa.layer.ok", sum(r.ok for r in results))


def add_event(name: str, **attributes: str | int | float | bool) -> None:
    """An event on the current span (a retry, a cut-off, a hedge): a no-op when none records."""
    span = _current()
    if span is not None:
        span.add_event(name, attributes)


# --- agent call --------------------------------------------------------------------------


async def traced_call(
    call: AgentCall, providers: Mapping[str, ProviderConfig], run: Awaitable[AgentResult]
) -> AgentResult:
    """Await one agent call (`run`, retries included) inside its span."""
    agent = call.agent
    with _span(f"chat {agent.model}", _trace.SpanKind.CLIENT if _trace else None) as span:
        if span is None:
            return await run
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": agent.model,
            "gen_ai.request.temperature": agent.temperature,
            "gen_ai.request.max_tokens": agent.max_tokens,
            "moa.provider": agent.provider,
            "moa.layer": call.layer,
            "moa.agent.index": call.index,
        }
        if agent.top_p is not None:
            attributes["gen_ai.request.top_p"] = agent.top_p
        if agent.seed is not None:
            attributes["gen_ai.request.seed"] = agent.seed
        attributes.update(_server(providers, agent.provider))
        span.set_attributes(attributes)
        try:
            result = await run
        except BaseException as error:
            if _cancelled(error):
                span.set_attribute("moa.agent.status", "cancelled")
            else:
                _fail(span, error)
            raise
        _record_call(span, providers, result)
        return result


def _record_call(span: Any, providers: Mapping[str, ProviderConfig], result: AgentResult) -> None:
    from moa.pricing import agent_cost

    span.set_attribute("moa.agent.status", result.status)
    span.set_attribute("moa.agent.attempts", result.attempts)
    span.set_attributes(
        _outcome(result.usage, result.latency_s, agent_cost(providers, result), result.output)
    )
    if result.hedge is not None:
        span.set_attribute("moa.agent.hedge_winner", result.hedge)
    if result.references_trimmed:
        span.set_attribute("moa.references_trimmed", True)
    if result.status == "failed":
        span.set_attribute("error.type", "agent_failed")
        span.set_status(_trace.Status(_trace.StatusCode.ERROR, result.error or "failed"))


def _server(providers: Mapping[str, ProviderConfig], name: str) -> dict[str, Any]:
    """server.address / server.port from the provider's base_url (never its credentials)."""
    config = providers.get(name)
    if config is None:
        return {}
    parts = urlsplit(config.endpoint())  # a host only for HTTP endpoints
    found: dict[str, Any] = {}
    if parts.hostname:
        found["server.address"] = parts.hostname
    with contextlib.suppress(ValueError):
        if parts.port is not None:
            found["server.port"] = parts.port
    return found


def note_request(request: ChatRequest) -> None:
    """The prompt an attempt sends: recorded only when content capture is on."""
    if not _capturing():
        return
    span = _current()
    if span is not None:
        span.set_attribute("gen_ai.input.messages", _messages_json(request.messages))


def note_response(completion: Completion) -> None:
    span = _current()
    if span is not None and completion.finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [completion.finish_reason])


def _messages_json(messages: Sequence[Any]) -> str:
    return json.dumps(
        [
            {"role": m["role"], "parts": [{"type": "text", "content": m["content"]}]}
            for m in messages
        ],
        ensure_ascii=False,
    )
