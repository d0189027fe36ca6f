"""`POST /v1/moa/runs`: one run's events as server-sent events, for the web page and any client.

The request body is the one `/v1/chat/completions` takes (model, messages, temperature, top_p,
max_tokens; checked the same way). The answer is `text/event-stream`, one JSON object per event:

    data: {"type": "run_started", "t": 0.0, "id": "run-…", "model": "…", "layers": [[{…}]], …}
    data: {"type": "agent_started", "t": 0.001, "layer": 1, "index": 0, "provider": …, …}
    data: {"type": "agent_text_delta", "t": 0.2, "layer": 1, "index": 0, "text": "…"}
    data: {"type": "agent_finished", "t": 0.9, "is_aggregator": false, "result": {…}}
    data: {"type": "text_delta", "t": 1.1, "text": "…"}
    data: {"type": "done", "t": 2.3, "result": {…}, "cost": {"usd": 0.0012, "unpriced_calls": 0}}

or, when the run fails, a last `{"type": "error", "message": …, "code": …, "result": {…}}`.
Every library event is in its `moa.results.event_to_dict` form; this module adds `run_started`
(the pipeline's shape), `error`, the `cost` of `done`, and `t`: seconds since the run started
on the server, which is what the page's timeline draws. Lines starting with ":" are keep-alive
comments. Closing the connection cancels the run and every upstream call in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from moa.engine import MoA
from moa.errors import RunError
from moa.pricing import run_cost
from moa.providers.base import ChatMessage
from moa.results import AgentTextDelta, Done, TextDelta, event_to_dict
from moa.server.chat import EventSender, run_error, run_unless_disconnected
from moa.server.guards import Slot, read_body
from moa.server.schema import parse_chat_request
from moa.server.shutdown import ResponseTracker, answer_cut_short
from moa.strategies import window_chunks

if TYPE_CHECKING:
    from moa.server.app import ServerState

__all__ = ["EventRun", "pipeline_shape", "start_run"]

log = logging.getLogger("moa.server")


def pipeline_shape(moa: MoA) -> dict[str, Any]:
    """The agents a run will call, layer by layer: the `run_started` event's body."""

    def agent(provider: str, model: str) -> dict[str, str]:
        return {"provider": provider, "model": model}

    pipeline = moa.pipeline
    return {
        "model": moa.name,
        "layers": [[agent(a.provider, a.model) for a in layer.agents] for layer in pipeline.layers],
        "aggregator": agent(pipeline.aggregator.provider, pipeline.aggregator.model),
        "fallbacks": [agent(f.provider, f.model) for f in pipeline.fallbacks],
        "aggregator_calls": _aggregator_calls(moa),
    }


def _aggregator_calls(moa: MoA) -> int | None:
    """Calls the aggregator step makes when nothing fails; None when it depends on the run (a
    staircase makes one call a step, as many steps as the proposers' writing takes)."""
    pipeline = moa.pipeline
    aggregation = pipeline.aggregation
    if pipeline.staircase is not None:
        return None
    if aggregation.strategy in ("vote", "confidence"):  # a choice among the candidates
        return 0
    if aggregation.window is not None:
        candidates = len(pipeline.layers[-1].agents) if pipeline.layers else 0
        return len(window_chunks(candidates, aggregation.window))
    return 1


async def start_run(request: Request) -> EventRun:
    """The route: the same checks and limits as a chat completion, then the event stream."""
    state: ServerState = request.app.state.moa
    body = await read_body(request.scope, request.receive, state.max_body_bytes, state.body_timeout)
    chat, messages = parse_chat_request(body)
    moa = state.pipeline(chat.model).with_answer_settings(chat.answer_settings())
    if state.metrics is not None:  # the page's runs count like any other
        moa = state.metrics.observed(moa)
    slot = state.slots.take()
    # No await from here on: the slot is released by the run, which starts right away.
    return EventRun(moa, messages, slot, heartbeat_s=state.heartbeat_s)


class EventRun:
    """The response to one accepted run request (an ASGI app)."""

    def __init__(
        self, moa: MoA, messages: list[ChatMessage], slot: Slot, *, heartbeat_s: float
    ) -> None:
        self.moa = moa
        self.messages = messages
        self.slot = slot
        self.heartbeat_s = heartbeat_s
        self.id = f"run-{uuid.uuid4().hex}"
        self._started = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracked = ResponseTracker(send)
        try:
            if await run_unless_disconnected(self._stream(tracked), receive):
                log.info("%s: the client hung up; its run was cancelled", self.id)
        except asyncio.CancelledError:  # the end of the shutdown grace period: see ChatRun
            await answer_cut_short(scope, tracked, self.id)
        finally:
            self.slot.release()

    def _stamp(self, payload: dict[str, Any]) -> dict[str, Any]:
        kind = payload.pop("type")
        return {"type": kind, "t": round(time.monotonic() - self._started, 4), **payload}

    async def _stream(self, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # proxies must not hold tokens back
            (b"x-request-id", self.id.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        events = EventSender(send)
        keep_alive = asyncio.create_task(events.keep_alive(self.heartbeat_s))
        try:
            self._started = time.monotonic()
            shape = {"type": "run_started", "id": self.id, **pipeline_shape(self.moa)}
            await events.data(self._stamp(shape))
            await self._relay(events)
        finally:
            keep_alive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keep_alive
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay(self, sender: EventSender) -> None:
        try:
            stream = self.moa.stream(self.messages, agent_text=True)
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    payload = self._stamp(event_to_dict(event))
                    if isinstance(event, Done):
                        self.slot.release()  # the run is over: the next request may start
                        cost = run_cost(self.moa.provider_configs, event.result)
                        payload["cost"] = {"usd": cost.to_json(), "unpriced_calls": cost.unpriced}
                    if isinstance(event, TextDelta | AgentTextDelta):
                        await sender.text(payload)  # the model's words, as they are (and fast)
                    else:
                        await sender.data(payload)
        except RunError as error:
            log.warning("%s (model %s): %s", self.id, self.moa.name, error)
            failure = run_error(error, self.moa.name)
            partial = None if error.result is None else event_to_dict(Done(error.result))["result"]
            await sender.data(
                self._stamp(
                    {
                        "type": "error",
                        "message": failure.message,
                        "code": failure.code,
                        "result": partial,
                    }
                )
            )
        except Exception:
            # The status line went out long ago: all that is left is to say so in the stream.
            log.exception("%s (model %s): the run failed", self.id, self.moa.name)
            await sender.data(
                self._stamp(
                    {
                        "type": "error",
                        "message": "internal error: see the server log",
                        "code": "internal",
                        "result": None,
                    }
                )
            )
