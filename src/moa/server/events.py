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

import contextlib
import time
from collections.abc import Coroutine
from typing import Any

from starlette.types import Scope, Send

from moa.engine import MoA
from moa.errors import RunError
from moa.pricing import run_cost
from moa.results import AgentTextDelta, Done, TextDelta, event_to_dict
from moa.server.chat import ChatRun, EventSender
from moa.strategies import window_chunks

__all__ = ["EventRun", "pipeline_shape"]


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


class EventRun(ChatRun):
    """The response to one accepted run request (an ASGI app): always a stream of events."""

    id_prefix = "run-"

    #: When the stream started (set then): the events' times count from it.
    _started: float

    def _respond(self, scope: Scope, send: Send) -> Coroutine[Any, Any, None]:
        return self._stream(send)

    def _stamp(self, payload: dict[str, Any]) -> dict[str, Any]:
        kind = payload.pop("type")
        return {"type": kind, "t": round(time.monotonic() - self._started, 4), **payload}

    async def _send_events(self, events: EventSender) -> None:
        self._started = time.monotonic()
        shape = {"type": "run_started", "id": self.id, **pipeline_shape(self.moa)}
        await events.data(self._stamp(shape))
        async with contextlib.aclosing(self.moa.stream(self.messages, agent_text=True)) as stream:
            async for event in stream:
                payload = self._stamp(event_to_dict(event))
                if isinstance(event, Done):
                    self.slot.release()  # the run is over: the next request may start
                    cost = run_cost(self.moa.provider_configs, event.result)
                    payload["cost"] = {"usd": cost.to_json(), "unpriced_calls": cost.unpriced}
                if isinstance(event, TextDelta | AgentTextDelta):
                    await events.text(payload)  # the model's words, as they are (and fast)
                else:
                    await events.data(payload)

    async def _send_failure(self, events: EventSender, error: Exception) -> None:
        failure = self._failure(error, "the run failed")
        result = error.result if isinstance(error, RunError) else None
        partial = None if result is None else event_to_dict(Done(result))["result"]
        error_event = {"type": "error", "message": failure.message, "code": failure.code}
        await events.data(self._stamp({**error_event, "result": partial}))
