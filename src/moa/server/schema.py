"""Request bodies checked the way OpenAI's API checks them, and that of `/v1/chat/completions`.

OpenAI adds request fields often, and clients send them by default; an unknown field is ignored
rather than refused, so a newer client keeps working. Three kinds of field are refused instead:

* fields that would send upstream calls elsewhere or with other credentials (`base_url`,
  `api_key`, ...): a client must never be able to point our keys at its own server;
* features a MoA pipeline cannot honour (tools, stop sequences, JSON mode, logprobs, n > 1):
  silently ignoring them would hand back an answer the client did not ask for;
* values of the wrong type or out of range, exactly as OpenAI would.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar, final

from pydantic import Field, ValidationError

from moa._text import find_unencodable
from moa._validation import first_problem
from moa.providers.base import ChatMessage
from moa.server.errors import ApiError, invalid, unsupported
from moa.server.guards import redirect_field
from moa.server.messages import check_conversation, parse_message
from moa.server.params import ApiRequest, SamplingRequest

__all__ = [
    "ChatCompletionRequest",
    "decode_body",
    "parse_request",
    "refuse_redirects",
    "schema_error",
]

R = TypeVar("R", bound=ApiRequest)


def parse_request(body: bytes, kind: type[R]) -> tuple[R, list[ChatMessage]]:
    """The validated request and its messages, or an ApiError(400) naming the bad field."""
    data = decode_body(body, kind.what)
    refuse_redirects(data)
    try:
        request = kind.model_validate(data)
    except ValidationError as error:
        raise schema_error(error) from None
    request.check()
    return request, request.to_messages()


@final
class ChatCompletionRequest(SamplingRequest):
    """The fields we act on (see SamplingRequest for those it shares with legacy completions,
    and ApiRequest for those every endpoint takes); anything else OpenAI defines is accepted
    and has no effect."""

    what = "a chat completion request"

    messages: list[dict[str, Any]] = Field(min_length=1)
    # Like max_tokens, applied to the aggregator (and its fallbacks): they write the answer.
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Refused unless left at their neutral value: see `check`.
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None

    @property
    def answer_tokens(self) -> int | None:
        """The cap on the answer: `max_completion_tokens` is OpenAI's newer name for it."""
        return self.max_completion_tokens or self.max_tokens

    def check(self) -> None:
        super().check()
        self.check_stop()
        if self.tools or self.functions:
            param = "tools" if self.tools else "functions"
            raise unsupported(param, "tool and function calling are not supported by MoA pipelines")
        if self.tool_choice not in (None, "none", "auto"):
            raise unsupported("tool_choice", "tool calling is not supported by MoA pipelines")
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise unsupported(
                "response_format", f"response_format {kind!r} is not supported; only 'text' is"
            )
        if self.logprobs:
            raise unsupported("logprobs", "logprobs are not available from a MoA pipeline")
        both = self.max_tokens and self.max_completion_tokens
        if both and self.max_tokens != self.max_completion_tokens:
            raise invalid(
                "max_tokens and max_completion_tokens disagree: send only one of them", "max_tokens"
            )

    def to_messages(self) -> list[ChatMessage]:
        messages = [parse_message(m, f"messages[{n}]") for n, m in enumerate(self.messages)]
        return check_conversation(messages, "messages")


def decode_body(body: bytes, what: str) -> dict[str, Any]:
    """The JSON object of a request body, or a 400 saying what is wrong with it."""
    if not body.strip():
        raise invalid(
            f"the request body is empty: send {what} as a JSON object", code="invalid_json"
        )
    try:
        data = json.loads(body, parse_constant=_no_constants)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, our NaN refusal
        raise ApiError(
            400,
            f"the request body is not valid JSON ({error}); send a JSON object",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise ApiError(
            400, f"the request body is nested too deeply; send {what}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, got a JSON {type(data).__name__}")
    unencodable = find_unencodable(data)
    if unencodable is not None:
        where, problem = unencodable
        raise invalid(
            f"{where}: the text has {problem}, which cannot be encoded as UTF-8 (a cut emoji?): "
            "fix or remove it",
            where,
            code="invalid_text",
        )
    return data


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def refuse_redirects(data: Mapping[str, Any]) -> None:
    """A 400 for any field that would re-target or re-key upstream calls, in any spelling:
    see `moa.server.guards.redirect_field`."""
    key = redirect_field(data)
    if key is not None:
        raise ApiError(
            400,
            f"{key}: this server decides where upstream calls go and which keys they use; "
            "remove this field from the request",
            param=key,
            code="forbidden_parameter",
        )


def schema_error(error: ValidationError) -> ApiError:
    problem = first_problem(error)
    param = _param(problem.location)
    if problem.kind == "missing":
        return invalid(f"{param}: this field is required", param, code="missing_required_parameter")
    value = problem.value
    shown = ""
    if isinstance(value, str | int | float | bool) or value is None:
        text = json.dumps(value)
        shown = f" (got {text if len(text) <= 40 else text[:40] + '…'})"
    return invalid(f"{param}: {problem.message}{shown}", param)


def _param(location: tuple[int | str, ...]) -> str:
    """("messages", 0, "content") -> "messages[0].content"."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text
