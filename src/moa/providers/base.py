"""The one small protocol every backend implements, and the values that cross it.

A provider knows how to send one chat request to one backend (an HTTP endpoint, an embedded
model) and nothing about layers, retries or references: those belong to the core.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypedDict, runtime_checkable

from moa.results import TokenLogprob, Usage

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "Completion",
    "Provider",
    "ProviderBase",
    "ProviderWrapper",
    "StreamChunk",
    "estimate_text_tokens",
    "estimate_tokens",
]


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: Sequence[ChatMessage]
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    seed: int | None = None
    #: Seconds for this attempt; the core also enforces it, this lets the transport give up too.
    timeout: float | None = None
    #: Which of several identical agents (Self-MoA: one model sampled n times) this call is
    #: (the agent's index in its layer); not sent upstream, but part of a cache key so the n
    #: samples stay distinct.
    sample_index: int = 0
    #: The last message is a partial assistant answer to extend (staircase streaming), not a
    #: finished turn. Only sent to providers that can continue natively: see moa.continuation.
    continue_final: bool = False
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop: Sequence[str] | None = None
    #: The embedded llama.cpp model only (the config refuses them for HTTP providers).
    repeat_penalty: float | None = None
    min_p: float | None = None
    #: Ask for the sampled tokens' log-probabilities, and this many alternatives per token.
    logprobs: bool = False
    top_logprobs: int | None = None
    #: The end user the call serves (OpenAI's `user` field); it does not change the answer.
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    finish_reason: str | None = None
    #: None when the backend did not report usage.
    usage: Usage | None = None
    #: The tokens' log-probabilities when asked for; None when not asked or not given.
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True, slots=True)
class StreamChunk:
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    #: Log-probabilities of this chunk's tokens, when asked for and given.
    logprobs: tuple[TokenLogprob, ...] | None = None


@runtime_checkable
class Provider(Protocol):
    """A backend for chat completions."""

    name: str

    async def complete(self, request: ChatRequest) -> Completion:
        """One whole answer. Raises a `moa.errors.ProviderError` subclass on failure."""
        ...

    def stream(self, request: ChatRequest) -> AsyncGenerator[StreamChunk, None]:
        """The answer in pieces; the last piece carries finish_reason (and usage if known).
        Raises `StreamInterrupted` if the stream breaks after text has arrived. An async
        generator, so a reader that stops early closes it (`contextlib.aclosing`) and the
        upstream request ends at once."""
        ...

    async def count_tokens(self, model: str, messages: Sequence[ChatMessage]) -> int:
        """Tokens the prompt takes: exact where the provider can tell, else an estimate."""
        ...

    def context_window(self, model: str) -> int | None:
        """The model's context size if this provider knows it, else None."""
        ...

    async def aclose(self) -> None: ...


class ProviderBase:
    """What a backend that knows no better answers for the protocol's secondary members:
    estimated token counts, an unknown context window, nothing to close."""

    name: str

    async def count_tokens(self, model: str, messages: Sequence[ChatMessage]) -> int:
        return estimate_tokens(messages)

    def context_window(self, model: str) -> int | None:
        return None

    async def aclose(self) -> None:
        return None


class ProviderWrapper(ProviderBase):
    """A provider that adds something around another one (a cache, rate limits): every member
    it does not override goes to `inner`, so each wrapper writes only what it changes."""

    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        self.name = inner.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    async def complete(self, request: ChatRequest) -> Completion:
        return await self.inner.complete(request)

    def stream(self, request: ChatRequest) -> AsyncGenerator[StreamChunk, None]:
        return self.inner.stream(request)

    async def count_tokens(self, model: str, messages: Sequence[ChatMessage]) -> int:
        return await self.inner.count_tokens(model, messages)

    def context_window(self, model: str) -> int | None:
        return self.inner.context_window(model)

    async def aclose(self) -> None:
        await self.inner.aclose()


#: Per-message overhead of chat templates (role markers, separators), in tokens.
_MESSAGE_OVERHEAD = 4


def estimate_text_tokens(text: str) -> int:
    """The one tokenizer-free estimate: one token per 3 characters, rounded up.

    Real BPE tokenizers average about 4 characters per token on English prose and fewer on
    code or other scripts; dividing by 3 overestimates on purpose, so that a prompt we let
    through rarely fails upstream (which would cost a round trip and a retry), and a budget
    counted with it errs on the safe side.
    """
    return len(text) // 3 + 1


def estimate_tokens(messages: Sequence[ChatMessage]) -> int:
    """A prompt's tokens for providers without a tokenizer: its texts plus template markers."""
    return sum(estimate_text_tokens(m["content"]) + _MESSAGE_OVERHEAD for m in messages)
