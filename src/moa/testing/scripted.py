"""A provider in the test's own process: scripted answers, failures and delays, no HTTP.

It implements the provider protocol like any backend, so the core runs unchanged on it; what
it answers is scripted per model, the way `FakeOpenAIServer` scripts an upstream, and every
call is recorded. Delays are awaited on the event loop's clock: under `run_virtual` they take
no real time.

    provider = ScriptedProvider("fake")
    provider.script("p1", Answer(error=RateLimited("busy")), Answer("fine"))
    moa = MoA(pipeline, {"fake": provider})
    result = run_virtual(moa.arun("question?"))
    assert [c.model for c in provider.calls] == ["p1", "p1", "agg"]
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict, deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from moa.errors import MalformedResponse, ProviderError, StreamInterrupted
from moa.providers.base import (
    ChatMessage,
    ChatRequest,
    Completion,
    StreamChunk,
    estimate_text_tokens,
    estimate_tokens,
)
from moa.providers.collect import collect
from moa.results import Usage

__all__ = ["Answer", "ScriptedCall", "ScriptedProvider"]


@dataclass(frozen=True)
class Answer:
    """One scripted outcome of a call. Unset text means the default: '<model> answer <n>'."""

    text: str | None = None
    #: Seconds before the answer starts (the first chunk, when streaming); inf: never.
    delay: float = 0.0
    #: Streaming: seconds between chunks.
    chunk_delay: float = 0.0
    #: Raised after `delay`, before any text.
    error: ProviderError | None = None
    #: Stop after this many chunks: a stream breaks (StreamInterrupted, with the text sent), a
    #: whole answer arrives cut (MalformedResponse, retried like a 5xx).
    cut_after_chunks: int | None = None
    finish_reason: str = "stop"
    #: What the provider reports; None: an estimate. `report_usage=False` reports none.
    usage: Usage | None = None
    report_usage: bool = True


@dataclass
class ScriptedCall:
    request: ChatRequest
    stream: bool
    #: On the loop's clock.
    started: float
    ended: float | None = None
    #: The caller left before the answer was complete (cancelled, or closed the stream).
    abandoned: bool = False

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def text(self) -> str:
        """All message contents of the request, joined: handy for `in` checks."""
        return "\n".join(m["content"] for m in self.request.messages)


class ScriptedProvider:
    """Answers as scripted for each model ("*" for any), then `default`; see the module doc."""

    def __init__(
        self,
        name: str = "fake",
        *,
        default: Answer | None = None,
        chunk_size: int = 8,
    ) -> None:
        self.name = name
        self.default = default or Answer()
        self.chunk_size = chunk_size
        self.calls: list[ScriptedCall] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.closed = False
        self._scripts: dict[str, deque[Answer]] = defaultdict(deque)
        self._counts: dict[str, itertools.count[int]] = defaultdict(itertools.count)

    def script(self, model: str, *answers: Answer) -> None:
        """Queue answers for `model`; each is used once, then the default."""
        self._scripts[model].extend(answers)

    def calls_for(self, model: str) -> list[ScriptedCall]:
        return [c for c in self.calls if c.model == model]

    def _next(self, request: ChatRequest) -> tuple[Answer, str]:
        n = next(self._counts[request.model])
        queued = self._scripts[request.model] or self._scripts["*"]
        answer = queued.popleft() if queued else self.default
        text = f"{request.model} answer {n}" if answer.text is None else answer.text
        return answer, text

    async def complete(self, request: ChatRequest) -> Completion:
        return await collect(self._answer(request, stream=False))

    def stream(self, request: ChatRequest) -> AsyncGenerator[StreamChunk, None]:
        return self._answer(request, stream=True)

    async def _answer(self, request: ChatRequest, *, stream: bool) -> AsyncGenerator[StreamChunk]:
        answer, text = self._next(request)
        loop = asyncio.get_running_loop()
        call = ScriptedCall(request, stream, started=loop.time())
        self.calls.append(call)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(answer.delay)
            if answer.error is not None:
                raise answer.error
            size = self.chunk_size if stream else max(len(text), 1)
            pieces = [text[i : i + size] for i in range(0, len(text), size)]
            cut = answer.cut_after_chunks
            for number, piece in enumerate(pieces):
                if cut is not None and (number >= cut or not stream):
                    raise self._cut(request, "".join(pieces[:number]))
                if number and answer.chunk_delay:
                    await asyncio.sleep(answer.chunk_delay)
                yield StreamChunk(text=piece)
            usage = self._usage(answer, request, text)
            yield StreamChunk(finish_reason=answer.finish_reason, usage=usage)
        except (asyncio.CancelledError, GeneratorExit):
            call.abandoned = True  # cancelled, or the reader left
            raise
        finally:
            self.in_flight -= 1
            call.ended = loop.time()

    def _cut(self, request: ChatRequest, sent: str) -> ProviderError:
        if sent:
            return StreamInterrupted(
                "the stream broke", partial=sent, provider=self.name, model=request.model
            )
        return MalformedResponse("the answer was cut off", provider=self.name, model=request.model)

    @staticmethod
    def _usage(answer: Answer, request: ChatRequest, text: str) -> Usage | None:
        if not answer.report_usage:
            return None
        return answer.usage or Usage(estimate_tokens(request.messages), estimate_text_tokens(text))

    async def count_tokens(self, model: str, messages: Sequence[ChatMessage]) -> int:
        return estimate_tokens(messages)

    def context_window(self, model: str) -> int | None:
        return None

    async def aclose(self) -> None:
        self.closed = True
