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

from typing import Any, final

from pydantic import Field

from moa.engine import AnswerSettings
from moa.providers.base import ChatMessage
from moa.results import RunResult
from moa.server.chat import ChatRun, EventSender, _moa_extension
from moa.server.errors import ApiError, unsupported
from moa.server.messages import check_conversation, parse_message
from moa.server.params import ApiRequest

__all__ = ["ResponsesRequest", "ResponsesRun"]


@final
class ResponsesRequest(ApiRequest):
    """The fields we act on; other fields OpenAI defines are accepted and have no effect."""

    what = "a Responses API request"

    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    # Refused unless left at their neutral value: see `check`.
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
    def include_usage(self) -> bool:
        return False  # the Responses API always reports usage, in its final event

    def answer_settings(self) -> AnswerSettings:
        return AnswerSettings(
            temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_output_tokens
        )

    def check(self) -> None:
        super().check()
        if self.tools:
            raise unsupported("tools", "tools are not supported by MoA pipelines")
        if self.tool_choice not in (None, "none", "auto"):
            raise unsupported("tool_choice", "tool calling is not supported by MoA pipelines")
        stateful = {
            "previous_response_id": self.previous_response_id,
            "conversation": self.conversation,
            "background": self.background,
            "prompt": self.prompt,
        }
        for name, value in stateful.items():
            if value:
                raise unsupported(
                    name,
                    f"{name} is not supported: this server stores no responses or prompts; send "
                    "the whole conversation in input",
                )
        kind = ((self.text or {}).get("format") or {}).get("type", "text")
        if kind != "text":
            raise unsupported(
                "text.format", f"text.format {kind!r} is not supported; only 'text' is"
            )
        if (self.reasoning or {}).get("effort") is not None:
            raise unsupported(
                "reasoning.effort",
                "reasoning effort is not supported by MoA pipelines; leave it unset",
            )
        if self.top_logprobs or any("logprobs" in item for item in self.include or ()):
            param = "top_logprobs" if self.top_logprobs else "include"
            raise unsupported(param, "logprobs are not available from a MoA pipeline")

    def to_messages(self) -> list[ChatMessage]:
        # Checked without our instructions message, so that errors number the client's items.
        system: list[ChatMessage] = []
        if self.instructions:
            system.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return system + check_conversation([{"role": "user", "content": self.input}], "input")
        messages: list[ChatMessage] = []
        for number, item in enumerate(self.input):
            where = f"input[{number}]"
            kind = item.get("type", "message") if isinstance(item, dict) else "message"
            if kind != "message":
                raise unsupported(
                    f"{where}.type",
                    f"{where}: {kind!r} items are not supported; MoA pipelines take messages "
                    "of text",
                )
            messages.append(parse_message(item, where))
        if not messages:
            raise ApiError(400, "input: at least one message is needed", param="input")
        return system + check_conversation(messages, "input")


class ResponsesRun(ChatRun):
    """The response to one accepted Responses API request (an ASGI app)."""

    request: ResponsesRequest
    request_type = ResponsesRequest
    id_prefix = "resp_"

    # The stream's state, set when it starts (one run, one stream).
    _sequence: int  # the last event's sequence_number
    _opened: bool  # the output message was announced

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
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": [_part(text)],
        }

    @property
    def message_id(self) -> str:
        return "msg_" + self.id.removeprefix("resp_")

    @property
    def _place(self) -> dict[str, Any]:
        """Where the answer's text goes: the one content part of the one output message."""
        return {"item_id": self.message_id, "output_index": 0, "content_index": 0}

    # --- not streamed ---------------------------------------------------------------------

    def _completion(self, result: RunResult) -> dict[str, Any]:
        return self._response("completed", result)

    # --- streamed -------------------------------------------------------------------------

    async def _emit(
        self, events: EventSender, kind: str, verbatim: bool = False, **fields: Any
    ) -> None:
        """One named event, numbered in order as the Responses API numbers them. `verbatim`: a
        piece of answer text, sent as it is (see EventSender.text)."""
        self._sequence += 1
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        await (events.text if verbatim else events.data)(payload, kind)

    async def _send_events(self, events: EventSender) -> None:
        self._sequence, self._opened = 0, False
        started = self._response("in_progress")
        await self._emit(events, "response.created", response=started)
        await self._emit(events, "response.in_progress", response=started)

        async def relay(text: str) -> None:
            if text:
                await self._open_message(events)
                delta = {"delta": text, "logprobs": [], **self._place}
                await self._emit(events, "response.output_text.delta", verbatim=True, **delta)

        result = await self._relay_text(relay)
        await self._open_message(events)  # an empty answer has its (empty) message too
        text = result.output
        await self._emit(events, "response.output_text.done", text=text, logprobs=[], **self._place)
        await self._emit(events, "response.content_part.done", part=_part(text), **self._place)
        item = self._message(text, "completed")
        await self._emit(events, "response.output_item.done", output_index=0, item=item)
        final = self._response("completed", result)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        await self._emit(events, kind, response=final)

    async def _open_message(self, events: EventSender) -> None:
        """Opens the output message, once: at the answer's first text, or at its end."""
        if self._opened:
            return
        self._opened = True
        item = self._message("", "in_progress")
        await self._emit(events, "response.output_item.added", output_index=0, item=item)
        await self._emit(events, "response.content_part.added", part=_part(""), **self._place)

    async def _send_failure(self, events: EventSender, error: Exception) -> None:
        failure = self._failure(error)
        report = {"code": failure.code, "message": failure.message}
        await self._emit(events, "response.failed", response=self._response("failed", error=report))


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


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
