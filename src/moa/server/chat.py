"""One chat completion: run the pipeline and answer as OpenAI would, streamed or not.

`ChatRun` is the ASGI response of a request that passed every check. It owns the request's
run slot, and it listens for the client hanging up while the run goes on: when that happens the
run is cancelled, which closes every upstream call still in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from starlette.types import Receive, Scope, Send

from moa.engine import MoA
from moa.errors import BudgetExceeded, RunError
from moa.providers.base import ChatMessage
from moa.results import Done, RunResult, TextDelta
from moa.server.errors import (
    INVALID_REQUEST,
    UPSTREAM_ERROR,
    ApiError,
    error_response,
    internal_error,
    json_bytes,
    json_response,
)
from moa.server.guards import Slot
from moa.server.params import ApiRequest
from moa.server.schema import ChatCompletionRequest
from moa.server.shutdown import ResponseTracker, answer_cut_short, receive_nothing

__all__ = ["ChatRun", "run_error"]

log = logging.getLogger("moa.server")


def run_error(error: RunError, model: str) -> ApiError:
    """A failed run as an API error that tells clients whether to retry.

    OpenAI's SDKs retry a 5xx twice by default, and here each retry is a whole run of
    n·(L−1)+1 upstream calls, so a failure no retry can fix must say so: a 400 where the
    request is at fault (over the token budget, too long for the models), and a 502 with
    `x-should-retry: false` where an upstream refused the calls themselves (a 400, 401 or
    404 upstream: our configuration, not an outage). Other failures stay plain 502s.
    """
    extra = {"moa": _moa_extension(error.result)} if error.result is not None else None
    message = f"model {model!r}: {error}"
    if isinstance(error, BudgetExceeded):
        return ApiError(400, message, code="budget_exceeded", type=INVALID_REQUEST, extra=extra)
    failed = [r for r in getattr(error, "results", ()) if not r.ok]
    kinds = {r.failure for r in failed}
    if failed and kinds == {"context_length"}:
        return ApiError(
            400,
            f"{message}; the conversation is too long for the pipeline's models: shorten it",
            code="context_length_exceeded",
            type=INVALID_REQUEST,
            extra=extra,
        )
    if failed and kinds <= {"rejected", "context_length"}:
        return ApiError(
            502,
            f"{message}; upstream refused the request, so retrying will not help",
            type=UPSTREAM_ERROR,
            code="upstream_rejected",
            headers={"x-should-retry": "false"},
            extra=extra,
        )
    return ApiError(502, message, type=UPSTREAM_ERROR, code="upstream_failed", extra=extra)


def _moa_extension(result: RunResult) -> dict[str, Any]:
    """Each layer's agent outputs, latency and usage (the answer itself is in `choices`)."""
    return {key: value for key, value in result.to_dict().items() if key != "output"}


def _finish_reason(result: RunResult) -> str:
    return "length" if result.aggregator.status == "truncated" else "stop"


class ChatRun:
    """The response to one accepted chat completion request (an ASGI app); the other
    endpoints' responses are subclasses that write other bodies and events."""

    #: The request body it answers, and the prefix of its id.
    request_type: type[ApiRequest] = ChatCompletionRequest
    id_prefix = "chatcmpl-"
    #: The `object` of a whole answer and of a streamed chunk (legacy completions differ).
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(
        self,
        moa: MoA,
        messages: list[ChatMessage],
        request: ApiRequest,
        slot: Slot,
        *,
        heartbeat_s: float,
    ) -> None:
        self.moa = moa
        self.messages = messages
        self.request = request
        self.slot = slot
        self.heartbeat_s = heartbeat_s
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracked = ResponseTracker(send)
        try:
            if await run_unless_disconnected(self._respond(scope, tracked), receive):
                log.info("%s: the client hung up; its run was cancelled", self.id)
        except asyncio.CancelledError:
            # Only the server cancels a request (at the end of its shutdown grace period):
            # say so in OpenAI's format rather than leave uvicorn's plain 500 or a cut stream.
            await answer_cut_short(scope, tracked, self.id)
        finally:
            self.slot.release()

    def _respond(self, scope: Scope, send: Send) -> Coroutine[Any, Any, None]:
        return self._stream(send) if self.request.streamed else self._complete(scope, send)

    def _failure(self, error: Exception, failed: str = "the stream failed") -> ApiError:
        """What the client is told of a failed run (logged here). Only a stream gets here with
        something other than a RunError (a bug): `failed` is what the log says of it."""
        if isinstance(error, RunError):
            log.warning("%s (model %s): %s", self.id, self.moa.name, error)
            return run_error(error, self.moa.name)
        log.exception("%s (model %s): %s", self.id, self.moa.name, failed)
        return internal_error()

    # --- not streamed ---------------------------------------------------------------------

    async def _complete(self, scope: Scope, send: Send) -> None:
        try:
            try:
                result = await self.moa.arun(self.messages)
            finally:
                # Free the slot before answering: a client that sends its next request as soon
                # as it has this answer must find the slot free.
                self.slot.release()
        except RunError as error:
            response = error_response(self._failure(error))
        else:
            response = json_response(self._completion(result), headers={"x-request-id": self.id})
        await response(scope, receive_nothing, send)  # the watcher owns the real receive

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.moa.name,
            "system_fingerprint": None,
            "choices": choices,
        }

    def _choice(self, result: RunResult) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": result.output, "refusal": None},
            "logprobs": None,
            "finish_reason": _finish_reason(result),
        }

    def _delta_choice(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def _completion(self, result: RunResult) -> dict[str, Any]:
        return {
            **self._envelope(self.object_name, [self._choice(result)]),
            "usage": result.usage.to_dict(),
            "moa": _moa_extension(result),
        }

    # --- streamed -------------------------------------------------------------------------

    async def _stream(self, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            # Tells nginx-style proxies not to buffer: tokens must reach the client as they come.
            (b"x-accel-buffering", b"no"),
            (b"x-request-id", self.id.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        events = EventSender(send)
        keep_alive = asyncio.create_task(events.keep_alive(self.heartbeat_s))
        try:
            await self._send_events(events)
        except Exception as error:
            # The status line went out long ago: all that is left is to say so in the stream.
            await self._send_failure(events, error)
        finally:
            self.slot.release()
            keep_alive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keep_alive
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_events(self, events: EventSender) -> None:
        await events.data(self._chunk({"role": "assistant", "content": ""}))
        result = await self._relay_text(lambda text: events.text(self._chunk({"content": text})))
        await events.data(self._chunk({}, _finish_reason(result), _moa_extension(result)))
        if self.request.include_usage:
            await events.data(self._usage_chunk(result))
        await events.raw(b"data: [DONE]\n\n")

    async def _send_failure(self, events: EventSender, error: Exception) -> None:
        await events.data(self._failure(error).body())

    async def _relay_text(self, relay: Callable[[str], Awaitable[None]]) -> RunResult:
        """Run the pipeline, relaying the answer's text as it comes; the run's result."""
        async with contextlib.aclosing(self.moa.stream(self.messages)) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    await relay(event.text)
                elif isinstance(event, Done):
                    self.slot.release()  # the run is over: see _complete
                    return event.result
        raise RuntimeError("the run ended without a result")  # pragma: no cover

    def _chunk(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        moa: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        chunk = self._envelope(self.chunk_object_name, [self._delta_choice(delta, finish_reason)])
        if self.request.include_usage:
            chunk["usage"] = None  # as OpenAI does: only the last chunk carries usage
        if moa is not None:
            chunk["moa"] = moa
        return chunk

    def _usage_chunk(self, result: RunResult) -> dict[str, Any]:
        return {**self._envelope(self.chunk_object_name, []), "usage": result.usage.to_dict()}


class EventSender:
    """Writes server-sent events; one writer at a time, so keep-alive comments never land in
    the middle of an event."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._lock = asyncio.Lock()
        self._last = time.monotonic()

    async def data(self, payload: Any, event: str | None = None) -> None:
        """An event built by us (errors, usage, the `moa` object): redacted."""
        await self._event(json_bytes(payload), event)

    async def text(self, payload: Any, event: str | None = None) -> None:
        """A chunk of answer text: the model's words, sent as they are (and fast)."""
        await self._event(
            json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode(), event
        )

    async def _event(self, body: bytes, name: str | None) -> None:
        head = b"event: " + name.encode() + b"\n" if name else b""
        await self.raw(head + b"data: " + body + b"\n\n")

    async def raw(self, body: bytes) -> None:
        async with self._lock:
            await self._send({"type": "http.response.body", "body": body, "more_body": True})
            self._last = time.monotonic()

    async def keep_alive(self, interval: float) -> None:
        """A comment line whenever `interval` seconds pass without an event, so proxies and
        clients do not give up on a connection that waits for slow proposer layers. SSE
        clients (the OpenAI SDK among them) ignore comment lines."""
        while True:
            wait = self._last + interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            await self.raw(b": keep-alive\n\n")


async def run_unless_disconnected(work: Coroutine[Any, Any, None], receive: Receive) -> bool:
    """Run `work`; if the client disconnects first, cancel it and return True.

    Exceptions of `work` propagate. The request body must have been read already: from then
    on the next thing `receive` reports is the client going away.
    """
    worker = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(receive))
    try:
        await asyncio.wait({worker, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone = watcher.done() and not watcher.cancelled() and not worker.done()
        for task in (worker, watcher):
            task.cancel()
        await asyncio.gather(worker, watcher, return_exceptions=True)
    if not gone and not worker.cancelled():
        worker.result()  # re-raise what the work raised
    return gone


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
