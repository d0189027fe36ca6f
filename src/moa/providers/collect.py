"""A stream's chunks added up to the `Completion` they make: the one collector every reader uses
(the core's calls, providers that answer `complete` by streaming, the call cache's tee)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

from moa.providers.base import Completion, StreamChunk
from moa.results import TokenLogprob, Usage
from moa.runaway import RUNAWAY_FINISH, Runaway, RunawayGuard

__all__ = ["StreamCollector", "collect"]


class StreamCollector:
    """The answer so far, chunk by chunk. With `stop_runaways`, the text is watched for a
    generation caught in a loop (moa.runaway): once one shows, `add` says to stop reading and
    the completion keeps the text up to the loop's first repeat."""

    def __init__(self, *, stop_runaways: bool = False) -> None:
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.logprobs: list[TokenLogprob] | None = None
        self.runaway: Runaway | None = None
        self._guard = RunawayGuard() if stop_runaways else None

    @property
    def text(self) -> str:
        """Every piece of text received, uncut."""
        return "".join(self.parts)

    def add(self, chunk: StreamChunk) -> bool:
        """Take one chunk; False once a runaway has shown (stop reading: the rest is waste)."""
        if chunk.text:
            self.parts.append(chunk.text)
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.usage = chunk.usage or self.usage
        if chunk.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(chunk.logprobs)  # in place: a copy per chunk is quadratic
        if self._guard is not None and chunk.text and self.runaway is None:
            self.runaway = self._guard.feed(chunk.text)
        return self.runaway is None

    async def read(
        self,
        chunks: AsyncGenerator[StreamChunk, None],
        on_text: Callable[[str], None] | None = None,
    ) -> None:
        """Read `chunks` to their end (or to a runaway), handing each piece of text to
        `on_text`; the stream is closed however reading ends, so its connection is released."""
        try:
            async for chunk in chunks:
                if chunk.text and on_text is not None:
                    on_text(chunk.text)
                if not self.add(chunk):
                    return
        finally:
            await chunks.aclose()

    def completion(self) -> Completion:
        text, finish = self.text, self.finish_reason
        if self.runaway is not None:
            text, finish = text[: self.runaway.keep], RUNAWAY_FINISH
        logprobs = None if self.logprobs is None else tuple(self.logprobs)
        return Completion(text=text, finish_reason=finish, usage=self.usage, logprobs=logprobs)


async def collect(
    chunks: AsyncGenerator[StreamChunk, None], *, stop_runaways: bool = False
) -> Completion:
    """The whole answer of a stream (closed once read)."""
    collector = StreamCollector(stop_runaways=stop_runaways)
    await collector.read(chunks)
    return collector.completion()
