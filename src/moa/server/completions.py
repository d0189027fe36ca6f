"""`POST /v1/completions`: OpenAI's legacy completions, for clients that still default to it
(LlamaIndex's `OpenAILike` unless `is_chat_model=True`).

The prompt string is sent to the pipeline as one user message: a MoA pipeline answers, it does
not continue raw text. One prompt per request (a list holding one string is accepted); token-id
prompts, `suffix`, `echo`, `best_of` > 1, `logprobs` and `stop` get a 400 naming them. Streamed
answers come as `text_completion` chunks ended by `data: [DONE]`, as OpenAI sends them.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from moa.providers.base import ChatMessage
from moa.results import RunResult
from moa.server.chat import ChatRun, _finish_reason
from moa.server.errors import unsupported
from moa.server.guards import read_body
from moa.server.messages import check_conversation
from moa.server.params import SamplingRequest
from moa.server.schema import decode_body, refuse_redirects, schema_error

if TYPE_CHECKING:
    from moa.server.app import ServerState

__all__ = ["CompletionRequest", "CompletionRun", "completions_endpoint", "parse_completion_request"]


class CompletionRequest(SamplingRequest):
    model: str = Field(min_length=1, max_length=256)
    prompt: str | list[Any]
    max_tokens: int | None = Field(default=None, ge=1)
    # Refused unless left at their neutral value: see `_refuse_unsupported`.
    n: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None
    stop: str | list[str] | None = None

    @property
    def answer_tokens(self) -> int | None:
        return self.max_tokens


def parse_completion_request(body: bytes) -> tuple[CompletionRequest, list[ChatMessage]]:
    data = decode_body(body, "a completion request")
    refuse_redirects(data)
    try:
        request = CompletionRequest.model_validate(data)
    except ValidationError as error:
        raise schema_error(error) from None
    request.check_sampling()
    _refuse_unsupported(request)
    return request, check_conversation([{"role": "user", "content": _prompt(request)}], "prompt")


def _prompt(request: CompletionRequest) -> str:
    prompt = request.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise unsupported(
                "prompt",
                "prompt must be one string (or a list of exactly one string): a MoA pipeline "
                "answers one prompt per request, and token-id prompts are not supported",
            )
        prompt = prompt[0]
    return prompt


def _refuse_unsupported(request: CompletionRequest) -> None:
    if request.n not in (None, 1):
        raise unsupported("n", "a MoA pipeline writes one answer per request: send n=1")
    if request.best_of not in (None, 1):
        raise unsupported("best_of", "best_of is not supported by MoA pipelines")
    if request.echo:
        raise unsupported("echo", "echo is not supported by MoA pipelines")
    if request.suffix:
        raise unsupported("suffix", "suffix (insertion) is not supported by MoA pipelines")
    if request.logprobs is not None:
        raise unsupported("logprobs", "logprobs are not available from a MoA pipeline")
    if request.stop:
        raise unsupported("stop", "stop sequences are not supported by MoA pipelines")


async def completions_endpoint(request: Request) -> Response | CompletionRun:
    state: ServerState = request.app.state.moa
    body = await read_body(request.scope, request.receive, state.max_body_bytes, state.body_timeout)
    parsed, messages = parse_completion_request(body)
    moa = state.pipeline(parsed.model).with_answer_settings(parsed.answer_settings())
    slot = state.slots.take()
    # No await from here on: the slot is released by the run, which starts right away.
    return CompletionRun(moa, messages, parsed, slot, heartbeat_s=state.heartbeat_s)


class CompletionRun(ChatRun):
    """The response to one accepted legacy completion request (an ASGI app)."""

    def _new_id(self) -> str:
        return f"cmpl-{uuid.uuid4().hex}"

    object_name = chunk_object_name = "text_completion"

    def _choice(self, result: RunResult) -> dict[str, Any]:
        return self._delta_choice({"content": result.output}, _finish_reason(result))

    def _delta_choice(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        text = delta.get("content", "")
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
