"""Hedged calls ("The Tail at Scale", Dean and Barroso 2013): when an agent's request has not
sent its first token `hedge_after` seconds in, an identical second request goes out (to the
same provider or a named other one). The first of the two to stream text wins; the other is
cancelled at once, which closes its connection.

    primary ──────── no token yet ─┬──────────────── first token? ─► winner, other cancelled
                     hedge_after ──┴─► hedge ──────── first token? ─┘

Both calls cost tokens: the loser's prompt (it was sent and read; it streamed no text, or it
would have won) is added to the winner's usage, so usage and cost tell the truth. A request that
fails before any text waits for the other one; only when both fail does the attempt fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Callable
from typing import Literal

from moa import tracing
from moa.budget import RunBudget
from moa.calls import AgentCall, call_agent
from moa.layer_calls import stop
from moa.providers.base import (
    ChatRequest,
    Completion,
    Provider,
    ProviderWrapper,
    StreamChunk,
    estimate_text_tokens,
)
from moa.providers.collect import collect
from moa.results import AgentResult, Usage

__all__ = ["HedgedProvider", "call_hedged"]

Side = Literal["primary", "hedge"]
_END = object()


class HedgedProvider(ProviderWrapper):
    """A provider that races a second identical request against a slow first one (token
    counts and the context window are the primary's).

    One instance serves one agent call (its attempts included) and remembers how the last
    attempt went: `winner` is None when no hedge was needed."""

    def __init__(self, primary: Provider, backup: Provider, after: float) -> None:
        super().__init__(primary)
        self.primary = primary
        self.backup = backup
        self.after = after
        self.winner: Side | None = None

    async def complete(self, request: ChatRequest) -> Completion:
        return await collect(self.stream(request))

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamChunk, None]:
        self.winner = None
        queue: asyncio.Queue[tuple[Side, object]] = asyncio.Queue()
        tasks: dict[Side, asyncio.Task[None]] = {
            "primary": asyncio.create_task(_pump(self.primary, request, "primary", queue))
        }
        winner: Side | None = None
        failures: dict[Side, BaseException] = {}
        text: list[str] = []
        finish: str | None = None
        usage: Usage | None = None
        try:
            loop = asyncio.get_running_loop()
            hedge_at = loop.time() + self.after
            while True:
                timeout = None
                if "hedge" not in tasks and winner is None:
                    timeout = max(0.0, hedge_at - loop.time())
                try:
                    side, item = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    tracing.add_event("moa.hedge", after_s=self.after)
                    tasks["hedge"] = asyncio.create_task(
                        _pump(self.backup, request, "hedge", queue)
                    )
                    continue
                if winner is not None and side != winner:
                    continue  # the loser's last words, already cancelled
                if isinstance(item, BaseException):
                    other: Side = "hedge" if side == "primary" else "primary"
                    if winner is None and other in tasks and other not in failures:
                        failures[side] = item  # the other request may still answer
                        continue
                    raise item
                if item is _END:
                    if winner is None:
                        winner = side
                    break
                assert isinstance(item, StreamChunk)
                if winner is None:
                    if not item.text and not item.finish_reason:
                        continue
                    winner = side
                    await stop(t for s, t in tasks.items() if s != winner)
                finish = item.finish_reason or finish
                usage = item.usage or usage
                if item.text:
                    text.append(item.text)
                    yield StreamChunk(text=item.text)
            self.winner = winner if len(tasks) > 1 else None
            total = usage or Usage(
                await self._prompt_tokens(winner, request), estimate_text_tokens("".join(text))
            )
            for side in tasks:
                if side != winner:  # it streamed no text (the first text wins): only its prompt
                    total = total + Usage(await self._prompt_tokens(side, request), 0)
            yield StreamChunk(finish_reason=finish, usage=total)
        finally:
            await stop(tasks.values())

    async def _prompt_tokens(self, side: Side, request: ChatRequest) -> int:
        provider = self.primary if side == "primary" else self.backup
        return await provider.count_tokens(request.model, request.messages)

    async def aclose(self) -> None:
        """Nothing of its own: the providers it races belong to the pipeline."""


async def _pump(
    provider: Provider,
    request: ChatRequest,
    side: Side,
    queue: asyncio.Queue[tuple[Side, object]],
) -> None:
    """Read one request's stream into the shared queue; its error, or _END, comes last."""
    chunks = provider.stream(request)
    try:
        async for chunk in chunks:
            queue.put_nowait((side, chunk))
    except asyncio.CancelledError:
        raise
    except Exception as error:
        queue.put_nowait((side, error))
        return
    finally:
        await chunks.aclose()  # however we stopped reading: the upstream request ends now
    queue.put_nowait((side, _END))


async def call_hedged(
    primary: Provider,
    backup: Provider,
    call: AgentCall,
    *,
    budget: RunBudget,
    on_text: Callable[[str], None] | None = None,
    quiet: bool = False,
) -> AgentResult:
    """`call_agent` with hedging; the result's `hedge` says which request won, if one was sent."""
    assert call.agent.hedge_after is not None
    hedged = HedgedProvider(primary, backup, call.agent.hedge_after)
    result = await call_agent(hedged, call, budget=budget, on_text=on_text, quiet=quiet)
    return dataclasses.replace(result, hedge=hedged.winner)
