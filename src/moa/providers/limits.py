"""Per-provider rate limits, shared by every row and agent that uses the provider.

    call ─► concurrency slot ─► rpm bucket ─► tpm bucket ─► 429 pause ─► upstream

`max_concurrency` caps calls in flight; `rpm` and `tpm` are token buckets refilled continuously.
A bucket holds at most one second of its rate, so requests go out evenly spread rather than a
minute's worth at once: providers often enforce per-minute limits over shorter windows.

A 429 slows the whole provider down, not only the call that got it: new calls pause for the
server's Retry-After (or a growing backoff), and the rates and the concurrency cap are halved,
doubling back every `RECOVERY_S` seconds without another 429. The error is then re-raised so
the core's retry loop decides about the call itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from moa.config import ProviderConfig
from moa.errors import RateLimited
from moa.providers.base import ChatRequest, Completion, Provider, ProviderWrapper, StreamChunk
from moa.results import Usage
from moa.retry import backoff

__all__ = [
    "GatedProvider",
    "LimitGate",
    "Limits",
    "RateLimitedProvider",
    "SlowDown",
    "TokenBucket",
]

#: Seconds of rate a bucket may hold: the largest burst.
BURST_S = 1.0
#: After a 429 the rate is halved; it doubles back after each of these quiet periods.
RECOVERY_S = 10.0
#: The slowest a provider is ever made (as a fraction of its configured limits).
MIN_FACTOR = 1 / 16
#: A request's output tokens are unknown beforehand; without max_tokens, reserve this many.
DEFAULT_RESERVED_OUTPUT = 512

Clock = Callable[[], float]
#: A gate's two halves: admit(tokens) waits for room and returns a ticket; finish(ticket, tokens
#: used, Retry-After, limited) hands the room back (see LimitGate.finish and `outcome`). The
#: ticket is whatever the gate needs to find the room again: for a LimitGate, the tokens it
#: reserved; for a batch's shared Gatekeeper (moa.batch.shared_limits), a lease id.
Admit = Callable[[int], Awaitable[int]]
Finish = Callable[[int, int | None, float | None, bool | None], None]


class SlowDown:
    """How much a provider is held back after 429s: a pause and a rate factor in (0, 1]."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._reduced = 1.0
        self._last_429: float | None = None
        self._streak = 0
        self.paused_until = 0.0

    def factor(self) -> float:
        """The fraction of the configured limits to use right now."""
        if self._last_429 is None:
            return 1.0
        quiet_periods = int((self._clock() - self._last_429) // RECOVERY_S)
        return min(1.0, self._reduced * 2.0**quiet_periods)

    def rate_limited(self, retry_after: float | None) -> None:
        now = self._clock()
        self._reduced = max(MIN_FACTOR, self.factor() / 2)
        self._last_429 = now
        self._streak += 1
        pause = retry_after
        if pause is None:
            pause = backoff(self._streak)  # the retry policy's, without its jitter
        self.paused_until = max(self.paused_until, now + pause)

    def succeeded(self) -> None:
        self._streak = 0

    async def wait(self) -> None:
        # A loop, not one sleep: another 429 may push the pause further while we wait.
        while (left := self.paused_until - self._clock()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(left)


class TokenBucket:
    """`rate` units per second, holding at most `BURST_S` seconds of them.

    Waiters are served in order (one at a time behind a lock), so a large request is not
    starved by small ones. A request larger than the bucket goes once the bucket is full and
    leaves it in debt, which later requests wait out.
    """

    def __init__(self, rate: float, slow_down: SlowDown, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.capacity = rate * BURST_S
        self.level = self.capacity
        self._slow_down = slow_down
        self._clock = clock
        self._updated = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> float:
        now = self._clock()
        rate = self.rate * self._slow_down.factor()
        self.level = min(self.capacity, self.level + (now - self._updated) * rate)
        self._updated = now
        return rate

    async def take(self, amount: float) -> None:
        async with self._lock:
            needed = min(amount, self.capacity)
            while True:
                rate = self._refill()
                if self.level >= needed:
                    break
                await asyncio.sleep((needed - self.level) / rate)
            self.level -= amount

    def adjust(self, amount: float) -> None:
        """Settle a reservation with what was really used: give back units reserved but not
        used, or take the excess (into debt, no waiting: the call already happened)."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class _Slots:
    """At most `limit()` holders at once; the limit may change, and waiters go in order."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if not self._waiters and self._in_use < self._limit():
            self._in_use += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self._in_use -= 1
        while self._waiters and self._in_use < self._limit():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_use += 1
                waiter.set_result(None)


@dataclass(frozen=True, slots=True)
class Limits:
    max_concurrency: int | None = None
    rpm: float | None = None
    tpm: float | None = None

    @classmethod
    def of(cls, config: ProviderConfig) -> Limits:
        return cls(config.max_concurrency, config.rpm, config.tpm)


class LimitGate:
    """One provider's limits, in two halves: `admit` waits for a slot and the bucket units,
    `finish` gives them back settled with the tokens used. Held in the process that calls
    (RateLimitedProvider) or, for a batch spread over processes, in its driver
    (moa.batch.shared_limits.Gatekeeper)."""

    def __init__(self, limits: Limits, clock: Clock = time.monotonic) -> None:
        self.limits = limits
        self.slow_down = SlowDown(clock)
        self._slots = _Slots(self._concurrency_now) if limits.max_concurrency else None
        self._requests = TokenBucket(limits.rpm / 60, self.slow_down, clock) if limits.rpm else None
        self._tokens = TokenBucket(limits.tpm / 60, self.slow_down, clock) if limits.tpm else None

    def _concurrency_now(self) -> int:
        assert self.limits.max_concurrency is not None
        return max(1, math.ceil(self.limits.max_concurrency * self.slow_down.factor()))

    async def admit(self, tokens: int) -> int:
        """Wait for room for a call reserving `tokens`; returns the ticket: those tokens."""
        if self._slots is not None:
            await self._slots.acquire()
        try:
            if self._requests is not None:
                await self._requests.take(1)
            if self._tokens is not None:
                await self._tokens.take(tokens)
            await self.slow_down.wait()  # a 429 may have arrived while we queued
        except BaseException:
            if self._slots is not None:
                self._slots.release()
            raise
        return tokens

    def finish(
        self, ticket: int, used: int | None, retry_after: float | None, limited: bool | None
    ) -> None:
        """`ticket`: what admit returned, the tokens reserved. `limited`: the call got a 429
        (True), succeeded (False), or failed otherwise (None: neither slows the provider down
        nor ends a run of 429s)."""
        if limited:
            self.slow_down.rate_limited(retry_after)
        elif limited is False:
            self.slow_down.succeeded()
        if self._tokens is not None and used is not None:
            self._tokens.adjust(ticket - used)
        if self._slots is not None:
            self._slots.release()


class _Spent:
    """The tokens one call used, once it reports them (None until then)."""

    tokens: int | None = None

    def settle(self, usage: Usage | None) -> None:
        if usage is not None:
            self.tokens = usage.total_tokens


class GatedProvider(ProviderWrapper):
    """A provider whose calls pass a gate: `admit` before the call, with the tokens it may take
    (its prompt and token cap), and `finish` after it (a stream's too, when it ends or its
    reader closes it), with the tokens it used and whether it got a 429. Limits held in this
    process (RateLimitedProvider) and a batch's shared limits (moa.batch.shared_limits) are
    two such gates."""

    def __init__(self, inner: Provider, limits: Limits, admit: Admit, finish: Finish) -> None:
        super().__init__(inner)
        #: Whether calls reserve tokens (a tpm limit): counting a prompt costs a little.
        self.counts_tokens = bool(limits.tpm)
        self._admit = admit
        self._finish = finish

    @contextlib.asynccontextmanager
    async def _admitted(self, request: ChatRequest) -> AsyncIterator[_Spent]:
        tokens = 0
        if self.counts_tokens:
            prompt = await self.inner.count_tokens(request.model, request.messages)
            tokens = prompt + (request.max_tokens or DEFAULT_RESERVED_OUTPUT)
        spent = _Spent()
        ticket = await self._admit(tokens)
        try:
            yield spent
        except BaseException as error:
            self._finish(ticket, spent.tokens, *outcome(error))
            raise
        self._finish(ticket, spent.tokens, *outcome(None))

    async def complete(self, request: ChatRequest) -> Completion:
        async with self._admitted(request) as spent:
            completion = await self.inner.complete(request)
            spent.settle(completion.usage)
            return completion

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamChunk, None]:
        async with (
            self._admitted(request) as spent,
            contextlib.aclosing(self.inner.stream(request)) as chunks,
        ):
            async for chunk in chunks:
                spent.settle(chunk.usage)
                yield chunk


def outcome(error: BaseException | None) -> tuple[float | None, bool | None]:
    """A call's end as a gate's `finish` takes it: (Retry-After, limited)."""
    if isinstance(error, RateLimited):
        return error.retry_after, True
    return None, None if error is not None else False


class RateLimitedProvider(GatedProvider):
    """Wraps a provider with its configured limits, held in this process."""

    def __init__(self, inner: Provider, limits: Limits, clock: Clock = time.monotonic) -> None:
        self.gate = LimitGate(limits, clock)
        super().__init__(inner, limits, self.gate.admit, self.gate.finish)
