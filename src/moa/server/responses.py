"""`POST /v1/responses`: OpenAI's Responses API for text in and text out, streamed or not.

What pydantic-ai's `OpenAIResponsesModel`, the OpenAI Agents SDK and newer clients use by
default. Input is a string or a list of messages (text parts only); the answer is one
`message` output item with one `output_text` part; usage is in the Responses API's shape.
Streamed, the events are OpenAI's: `response.created`, `response.in_progress`,
`response.output_item.added`, `response.content_part.added`, `response.output_text.delta` ...,
`response.output_text.done`, `response.content_part.done`, `response.output_item.done`, then
`response.completed` (or `response.incomplete` when the answer hit the token cap, and
`response.failed` when the run failed after the stream began).

Refused with a 400 naming the field: tools, stored state (`previous_response_id`,
`conversation`, `background`, reusable `prompt`), non-text output formats, reasoning effort,
logprobs, and non-text input. This server stores no responses, whatever `store` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from moa.errors import RunError
from moa.providers.base import ChatMessage
from moa.results import Done, RunResult, TextDelta
from moa.server.chat import ChatRun, EventSender, _moa_extension, run_error
from moa.server.errors import ApiError, json_bytes, unsupported
from moa.server.guards import read_body
from moa.server.messages import check_conversation, parse_message
from moa.server.params import AnswerSettings, StreamOptions
from moa.server.schema import decode_body, refuse_redirects, schema_error

if TYPE_CHECKING:
    from moa.server.app import ServerState

__all__ = ["ResponsesRequest", "ResponsesRun", "parse_responses_request", "responses_endpoint"]

log = logging.getLogger("moa.server")


class ResponsesRequest(BaseModel):
    """The fields we act on; other fields OpenAI defines are accepted and have no effect."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    model: str = Field(min_length=1, max_length=256)
    input: str | list[Any]
    instructions: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    max_output_tokens: int | None = Field(default=None, ge=1)
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    # Refused unless left at their neutral value: see `_refuse_unsupported`.
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    prompt: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None

    @property
    def streamed(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return False  # the Responses API always reports usage, in its final event


def parse_responses_request(body: bytes) -> tuple[ResponsesRequest, list[ChatMessage]]:
    data = decode_body(body, "a Responses API request")
    refuse_redirects(data)
    try:
        request = ResponsesRequest.model_validate(data)
    except ValidationError as error:
        raise schema_error(error) from None
    _refuse_unsupported(request)
    return request, _conversation(request)


def _refuse_unsupported(request: ResponsesRequest) -> None:
    if request.stream_options is not None and not request.streamed:
        raise ApiError(
            400,
            "stream_options is only allowed with stream: true",
            param="stream_options",
            code="invalid_value",
        )
    if request.tools:
        raise unsupported("tools", "tools are not supported by MoA pipelines")
    if request.tool_choice not in (None, "none", "auto"):
        raise unsupported("tool_choice", "tool calling is not supported by MoA pipelines")
    stateful = {
        "previous_response_id": request.previous_response_id,
        "conversation": request.conversation,
        "background": request.background,
        "prompt": request.prompt,
    }
    for name, value in stateful.items():
        if value:
            raise unsupported(
                name,
                f"{name} is not supported: this server stores no responses or prompts; send "
                "the whole conversation in input",
            )
    kind = ((request.text or {}).get("format") or {}).get("type", "text")
    if kind != "text":
        raise unsupported("text.format", f"text.format {kind!r} is not supported; only 'text' is")
    if (request.reasoning or {}).get("effort") is not None:
        raise unsupported(
            "reasoning.effort", "reasoning effort is not supported by MoA pipelines; leave it unset"
        )
    if request.top_logprobs or any("logprobs" in item for item in request.include or ()):
        param = "top_logprobs" if request.top_logprobs else "include"
        raise unsupported(param, "logprobs are not available from a MoA pipeline")


def _conversation(request: ResponsesRequest) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
        return check_conversation(messages, "input")
    offset = len(messages)
    for number, item in enumerate(request.input):
        where = f"input[{number}]"
        kind = item.get("type", "message") if isinstance(item, dict) else "message"
        if kind != "message":
            raise unsupported(
                f"{where}.type",
                f"{where}: {kind!r} items are not supported; MoA pipelines take messages of text",
            )
        messages.append(parse_message(item, where))
    if len(messages) == offset:
        raise ApiError(400, "input: at least one message is needed", param="input")
    try:
        return check_conversation(messages, "input")
    except ApiError as error:
        if offset and error.param and error.param.startswith("input["):
            # Our instructions message shifted the numbers by one: name the client's item.
            index = int(error.param[6:].split("]")[0]) - offset
            error.param = f"input[{index}]" + error.param.split("]", 1)[1]
            error.message = error.message.replace(f"input[{index + offset}]", f"input[{index}]", 1)
        raise


async def responses_endpoint(request: Request) -> Response | ResponsesRun:
    state: ServerState = request.app.state.moa
    body = await read_body(request.scope, request.receive, state.max_body_bytes, state.body_timeout)
    parsed, messages = parse_responses_request(body)
    settings = AnswerSettings(
        temperature=parsed.temperature, top_p=parsed.top_p, max_tokens=parsed.max_output_tokens
    )
    moa = state.pipeline(parsed.model).with_answer_settings(settings)
    slot = state.slots.take()
    # No await from here on: the slot is released by the run, which starts right away.
    return ResponsesRun(moa, messages, parsed, slot, heartbeat_s=state.heartbeat_s)


class ResponsesRun(ChatRun):
    """The response to one accepted Responses API request (an ASGI app)."""

    request: ResponsesRequest

    def _new_id(self) -> str:
        return f"resp_{uuid.uuid4().hex}"

    def _response(
        self,
        status: str,
        result: RunResult | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        request = self.request
        output: list[dict[str, Any]] = []
        incomplete = None
        if result is not None:
            output = [self._message(result.output, "completed")]
            if result.aggregator.status == "truncated":
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        response: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "model": self.moa.name,
            "output": output,
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": request.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "top_p": request.top_p,
            "truncation": "disabled",
            "usage": _usage(result) if result is not None else None,
            "user": request.user,
            "metadata": request.metadata or {},
        }
        if result is not None:
            response["moa"] = _moa_extension(result)
        return response

    def _message(self, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": []}] if status else []
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    @property
    def message_id(self) -> str:
        return "msg_" + self.id.removeprefix("resp_")

    # --- not streamed ---------------------------------------------------------------------

    def _completion(self, result: RunResult) -> dict[str, Any]:
        return self._response("completed", result)

    # --- streamed -------------------------------------------------------------------------

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self._sse_headers()})
        events = _ResponseEvents(send)
        keep_alive = asyncio.create_task(events.keep_alive(self.heartbeat_s))
        try:
            started = self._response("in_progress")
            await events.emit("response.created", response=started)
            await events.emit("response.in_progress", response=started)
            await self._relay_answer(events)
        finally:
            self.slot.release()
            keep_alive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keep_alive
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay_answer(self, events: _ResponseEvents) -> None:
        place = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        opened = False
        parts: list[str] = []
        try:
            async with contextlib.aclosing(self.moa.stream(self.messages)) as stream:
                async for event in stream:
                    if isinstance(event, TextDelta) and event.text:
                        if not opened:
                            await self._open_message(events)
                            opened = True
                        parts.append(event.text)
                        await events.emit_text(
                            "response.output_text.delta", delta=event.text, logprobs=[], **place
                        )
                    elif isinstance(event, Done):
                        if not opened:
                            await self._open_message(events)
                        await self._close_message(events, event.result)
                        return
        except RunError as error:
            log.warning("%s (model %s): %s", self.id, self.moa.name, error)
            api = run_error(error, self.moa.name)
            failure = {"code": api.code, "message": api.message}
            await events.emit("response.failed", response=self._response("failed", error=failure))
        except Exception:
            # The status line went out long ago: all that is left is to say so in the stream.
            log.exception("%s (model %s): the stream failed", self.id, self.moa.name)
            failure = {"code": "internal", "message": "internal error: see the server log"}
            await events.emit("response.failed", response=self._response("failed", error=failure))

    async def _open_message(self, events: _ResponseEvents) -> None:
        await events.emit(
            "response.output_item.added", output_index=0, item=self._message("", "in_progress")
        )
        await events.emit(
            "response.content_part.added",
            item_id=self.message_id,
            output_index=0,
            content_index=0,
            part={"type": "output_text", "text": "", "annotations": []},
        )

    async def _close_message(self, events: _ResponseEvents, result: RunResult) -> None:
        self.slot.release()  # the run is over: see ChatRun._complete
        text = result.output
        place = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        await events.emit("response.output_text.done", text=text, logprobs=[], **place)
        part = {"type": "output_text", "text": text, "annotations": []}
        await events.emit("response.content_part.done", part=part, **place)
        await events.emit(
            "response.output_item.done", output_index=0, item=self._message(text, "completed")
        )
        final = self._response("completed", result)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        await events.emit(kind, response=final)

    def _sse_headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            (b"x-request-id", self.id.encode()),
        ]


def _usage(result: RunResult) -> dict[str, Any]:
    """The run's usage (every upstream call) in the Responses API's names."""
    usage = result.usage
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


class _ResponseEvents(EventSender):
    """Named server-sent events, numbered in order as the Responses API numbers them."""

    def __init__(self, send: Send) -> None:
        super().__init__(send)
        self._sequence = 0

    async def emit(self, kind: str, **fields: Any) -> None:
        """An event built by us: redacted, like every body we send (see EventSender.data)."""
        payload = {"type": kind, "sequence_number": self._next(), **fields}
        await self.raw(b"event: " + kind.encode() + b"\ndata: " + json_bytes(payload) + b"\n\n")

    async def emit_text(self, kind: str, **fields: Any) -> None:
        """A piece of answer text: the model's words, sent as they are (see EventSender.text)."""
        payload = {"type": kind, "sequence_number": self._next(), **fields}
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        await self.raw(f"event: {kind}\ndata: {body}\n\n".encode())

    def _next(self) -> int:
        self._sequence += 1
        return self._sequence
