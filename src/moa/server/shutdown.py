"""Answering a request whose run the server cancels at the end of its shutdown grace period.

uvicorn cancels the tasks still running when the grace period ends. Left alone, a request not
yet answered would get uvicorn's plain-text 500, and a stream would stop with no error event,
so a client could take a cut answer for a whole one. `ResponseTracker` notes how far a
response got; `answer_cut_short` then sends what OpenAI's clients understand: a 503 in
OpenAI's error format (their SDKs retry it), or an error event that ends the stream.
"""

from __future__ import annotations

import contextlib
import logging

from starlette.types import Message, Scope, Send

from moa.server.errors import SERVER_ERROR, ApiError, error_response, json_bytes

__all__ = ["SHUTDOWN_MESSAGE", "ResponseTracker", "answer_cut_short", "receive_nothing"]

log = logging.getLogger("moa.server")

SHUTDOWN_MESSAGE = (
    "the server shut down before this run finished (its grace period ended); retry the request"
)


class ResponseTracker:
    """An ASGI `send` that remembers whether the response started and whether it ended."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.ended = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.ended = True
        await self._send(message)


async def answer_cut_short(scope: Scope, send: ResponseTracker, request_id: str) -> None:
    """Finish a response whose run was cancelled by the server's shutdown."""
    if send.ended:
        return
    log.warning("%s: cancelled at the end of the shutdown grace period", request_id)
    error = ApiError(
        503,
        SHUTDOWN_MESSAGE,
        type=SERVER_ERROR,
        code="server_shutting_down",
        headers={"Retry-After": "1", "Connection": "close"},
    )
    # The client may be gone too: nothing to tell it then.
    with contextlib.suppress(Exception):
        if not send.started:
            await error_response(error)(scope, receive_nothing, send)
            return
        event = b"data: " + json_bytes(error.body()) + b"\n\n"
        await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def receive_nothing() -> Message:
    """The ASGI `receive` of a response sent after the request body was read."""
    return {"type": "http.disconnect"}
