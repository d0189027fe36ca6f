"""A request's conversation checked message by message, so that an error names the exact place
(`messages[2].content`, `input[0].role`) the way OpenAI's errors do.

A conversation must end with the user's message. A final assistant message (a "prefill", which
some APIs continue word for word) is refused with a 400 that says so: the proposers would each
have to continue it and the aggregator to merge continuations, and no answer written that way
would be what the client asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from moa.engine import normalize_messages
from moa.providers.base import ChatMessage
from moa.server.errors import ApiError, invalid, unsupported

__all__ = ["check_conversation", "parse_message", "text_content"]

#: OpenAI's names for a text part: chat's, and the Responses API's for input and output.
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
_ROLES: dict[Any, Literal["system", "user", "assistant"]] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}


def text_content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for number, part in enumerate(content):
            here = f"{where}[{number}]"
            if not isinstance(part, Mapping):
                raise invalid(f"{here}: a content part must be an object", here)
            kind = part.get("type", "text")
            if kind not in _TEXT_PARTS:
                raise ApiError(
                    400,
                    f"{here}: {kind!r} content is not supported; MoA pipelines take text only",
                    param=f"{here}.type",
                    code="unsupported_content",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"{here}.text: must be a string", f"{here}.text")
            texts.append(text)
        return "".join(texts)
    raise invalid(f"{where}: must be a string or a list of text parts", where)


def parse_message(message: Any, where: str) -> ChatMessage:
    """One chat message; `developer` counts as `system` (OpenAI's newer name for it)."""
    if not isinstance(message, Mapping):
        raise invalid(f"{where}: must be an object with role and content", where)
    role = message.get("role")
    if role in ("tool", "function"):
        raise unsupported(
            f"{where}.role",
            f"{where}: {role} messages are not supported: MoA pipelines do no tool calling",
        )
    if role not in _ROLES:
        raise invalid(
            f"{where}.role: must be one of system, developer, user or assistant (got {role!r})",
            f"{where}.role",
        )
    if "content" not in message:
        raise invalid(f"{where}.content: this field is required", f"{where}.content")
    return {"role": _ROLES[role], "content": text_content(message["content"], f"{where}.content")}


def check_conversation(messages: Sequence[ChatMessage], field: str) -> list[ChatMessage]:
    """The messages as the engine takes them, or a 400 naming the message at fault."""
    if not messages:
        raise invalid(f"{field}: at least one message is needed", field)
    last = f"{field}[{len(messages) - 1}]"
    role = messages[-1]["role"]
    if role == "assistant":
        raise ApiError(
            400,
            f"{last}: the conversation ends with an assistant message; a MoA pipeline answers "
            "the user's last message and does not continue a partial answer (prefill). End "
            "with a user message",
            param=last,
            code="unsupported_prefill",
        )
    if role != "user":
        raise invalid(f"{last}: the last message must be the user's (got a {role} message)", last)
    return normalize_messages(messages)  # raises nothing: every message was checked above
