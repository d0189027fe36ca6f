"""`POST /v1/completions`: OpenAI's legacy completions, for clients that still default to it
(LlamaIndex's `OpenAILike` unless `is_chat_model=True`).

The prompt string is sent to the pipeline as one user message: a MoA pipeline answers, it does
not continue raw text. One prompt per request (a list holding one string is accepted); token-id
prompts, `suffix`, `echo`, `best_of` > 1, `logprobs` and `stop` get a 400 naming them. Streamed
answers come as `text_completion` chunks ended by `data: [DONE]`, as OpenAI sends them.
"""

from __future__ import annotations

from typing import Any, final

from moa.providers.base import ChatMessage
from moa.results import RunResult
from moa.server.chat import ChatRun, _finish_reason
from moa.server.errors import unsupported
from moa.server.messages import check_conversation
from moa.server.params import SamplingRequest

__all__ = ["CompletionRequest", "CompletionRun"]


@final
class CompletionRequest(SamplingRequest):
    what = "a completion request"

    prompt: str | list[Any]
    # Refused unless left at their neutral value: see `check`.
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None

    def check(self) -> None:
        super().check()
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "best_of is not supported by MoA pipelines")
        if self.echo:
            raise unsupported("echo", "echo is not supported by MoA pipelines")
        if self.suffix:
            raise unsupported("suffix", "suffix (insertion) is not supported by MoA pipelines")
        if self.logprobs is not None:
            raise unsupported("logprobs", "logprobs are not available from a MoA pipeline")
        self.check_stop()

    def to_messages(self) -> list[ChatMessage]:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise unsupported(
                    "prompt",
                    "prompt must be one string (or a list of exactly one string): a MoA pipeline "
                    "answers one prompt per request, and token-id prompts are not supported",
                )
            prompt = prompt[0]
        return check_conversation([{"role": "user", "content": prompt}], "prompt")


class CompletionRun(ChatRun):
    """The response to one accepted legacy completion request (an ASGI app)."""

    request_type = CompletionRequest
    id_prefix = "cmpl-"
    object_name = chunk_object_name = "text_completion"

    def _choice(self, result: RunResult) -> dict[str, Any]:
        return self._delta_choice({"content": result.output}, _finish_reason(result))

    def _delta_choice(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        text = delta.get("content", "")
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
