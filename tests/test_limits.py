"""Per-provider rate limits, against the fake server over real HTTP.

Timing assertions are lower bounds with generous slack: a noisy machine only makes calls
later, never earlier, so these cannot flake from slowness.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from moa.config import OpenAIProviderConfig
from moa.env import Environment
from moa.errors import ProviderStatusError, RateLimited
from moa.providers import build_providers
from moa.providers.base import ChatRequest, Completion
from moa.providers.limits import (
    RECOVERY_S,
    LimitGate,
    Limits,
    RateLimitedProvider,
    SlowDown,
    _Slots,
    outcome,
)
from moa.providers.openai_compat import OpenAICompatibleProvider
from moa.retry import backoff
from moa.testing import FakeOpenAIServer, Reply


def _request(n: int = 0, **settings: Any) -> ChatRequest:
    return ChatRequest(model="m1", messages=[{"role": "user", "content": f"q{n}"}], **settings)


def _with_limits(
    fake: FakeOpenAIServer, test: Callable[[RateLimitedProvider], Awaitable[None]], **limits: Any
) -> None:
    async def go() -> None:
        provider = RateLimitedProvider(
            OpenAICompatibleProvider("fake", base_url=fake.base_url), Limits(**limits)
        )
        try:
            await test(provider)
        finally:
            await provider.aclose()

    asyncio.run(go())


def _starts(fake: FakeOpenAIServer) -> list[float]:
    return sorted(r.started for r in fake.requests)


def test_max_concurrency_caps_calls_in_flight(fake: FakeOpenAIServer) -> None:
    fake.script("*", *[Reply(latency=0.1) for _ in range(12)])

    async def test(provider: RateLimitedProvider) -> None:
        await asyncio.gather(*(provider.complete(_request(n)) for n in range(12)))

    _with_limits(fake, test, max_concurrency=3)
    assert len(fake.requests) == 12
    assert fake.max_in_flight == 3  # reached, never passed


def test_streams_hold_their_slot_until_they_end_or_are_closed(fake: FakeOpenAIServer) -> None:
    fake.script("*", *[Reply(text="y" * 80, chunk_delay=0.01) for _ in range(6)])

    async def test(provider: RateLimitedProvider) -> None:
        async def read(n: int, whole: bool) -> None:
            async with contextlib.aclosing(provider.stream(_request(n))) as chunks:
                async for chunk in chunks:
                    if chunk.text and not whole:
                        break  # closed early: the slot must come back

        async with asyncio.timeout(20):
            await asyncio.gather(*(read(n, whole=n % 2 == 0) for n in range(6)))

    _with_limits(fake, test, max_concurrency=2)
    assert len(fake.requests) == 6
    assert fake.max_in_flight <= 2


def test_rpm_spreads_requests_out(fake: FakeOpenAIServer) -> None:
    async def test(provider: RateLimitedProvider) -> None:
        await asyncio.gather(*(provider.complete(_request(n)) for n in range(10)))

    _with_limits(fake, test, rpm=240)  # 4 a second, at most one second's worth at once
    starts = _starts(fake)
    # 4 may go at once; the other 6 need 1.5 s of refill.
    assert starts[-1] - starts[0] >= 1.5 * 0.8
    # Never more than a burst plus a second's rate within any one second.
    for i, start in enumerate(starts):
        assert sum(1 for s in starts[i:] if s - start < 1.0) <= 8


def test_tpm_counts_the_tokens_really_used(fake: FakeOpenAIServer) -> None:
    # Each answer reports 40 tokens, far more than the 9 reserved; the bucket refills 20 a
    # second: the second call waits for the first's excess to be paid back (about 1.5 s).
    fake.script("*", Reply(usage=(20, 20)), Reply(usage=(20, 20)))

    async def test(provider: RateLimitedProvider) -> None:
        await provider.complete(_request(0, max_tokens=4))
        await provider.complete(_request(1, max_tokens=4))

    _with_limits(fake, test, tpm=1200)
    first, second = fake.requests
    assert first.ended is not None
    assert second.started - first.ended >= 1.45 * 0.8


def test_a_429_pauses_the_whole_provider_and_halves_its_rate(fake: FakeOpenAIServer) -> None:
    fake.script("m1", Reply(status=429, headers={"retry-after": "0.6"}))
    factors: list[float] = []

    async def test(provider: RateLimitedProvider) -> None:
        with pytest.raises(RateLimited):
            await provider.complete(_request(0))
        factors.append(provider.gate.slow_down.factor())
        # Calls from other rows, made after the 429, wait out the Retry-After too.
        results = await asyncio.gather(*(provider.complete(_request(n)) for n in range(1, 4)))
        assert all(isinstance(r, Completion) for r in results)

    _with_limits(fake, test, max_concurrency=4)
    limited, *later = fake.requests
    assert limited.ended is not None
    assert min(r.started for r in later) - limited.ended >= 0.6 * 0.8
    assert factors == [0.5]


def test_a_503_is_a_server_error_not_a_rate_limit(fake: FakeOpenAIServer) -> None:
    """An overloaded server's 503 is retried after its Retry-After, but it says nothing about
    our rate: the provider is neither slowed down nor paused, unlike after a 429."""
    fake.script("m1", Reply(status=503, headers={"retry-after": "30"}))
    caught: list[ProviderStatusError] = []
    factors: list[float] = []

    async def test(provider: RateLimitedProvider) -> None:
        with pytest.raises(ProviderStatusError) as error:
            await provider.complete(_request(0))
        caught.append(error.value)
        factors.append(provider.gate.slow_down.factor())
        # Not paused for the 30 s the 503 asked for: the next call goes at once.
        await asyncio.wait_for(provider.complete(_request(1)), timeout=10)

    _with_limits(fake, test, max_concurrency=4)
    (error,) = caught
    assert not isinstance(error, RateLimited)
    assert error.status_code == 503 and error.retryable and error.retry_after == 30
    assert factors == [1.0]


def test_slow_down_recovers_after_quiet_periods() -> None:
    now = [100.0]
    slow = SlowDown(clock=lambda: now[0])
    slow.rate_limited(retry_after=None)
    slow.rate_limited(retry_after=None)
    assert slow.factor() == 0.25
    # Without Retry-After, the pause is the retry policy's backoff after two failures in a row.
    assert slow.paused_until == 100.0 + backoff(2) == 100.0 + 2 * backoff(1)
    now[0] += RECOVERY_S
    assert slow.factor() == 0.5
    now[0] += RECOVERY_S * 5
    assert slow.factor() == 1.0


def test_reduced_concurrency_after_a_429(fake: FakeOpenAIServer) -> None:
    fake.script("m1", Reply(status=429, headers={"retry-after": "0"}))
    fake.script("*", *[Reply(latency=0.1) for _ in range(8)])

    async def test(provider: RateLimitedProvider) -> None:
        with pytest.raises(RateLimited):
            await provider.complete(_request(0))
        fake.max_in_flight = 0
        await asyncio.gather(*(provider.complete(_request(n)) for n in range(1, 9)))

    _with_limits(fake, test, max_concurrency=4)
    assert fake.max_in_flight == 2  # half of 4 until the provider has been quiet a while


def test_build_providers_wraps_only_limited_providers(fake: FakeOpenAIServer) -> None:
    configs = {
        "plain": OpenAIProviderConfig(base_url=fake.base_url),
        "limited": OpenAIProviderConfig(base_url=fake.base_url, max_concurrency=2, rpm=60),
    }

    async def go() -> None:
        providers = build_providers(configs, ["plain", "limited"], Environment({}))
        try:
            assert isinstance(providers["plain"], OpenAICompatibleProvider)
            limited = providers["limited"]
            assert isinstance(limited, RateLimitedProvider)
            assert limited.name == "limited" and limited.gate.limits.max_concurrency == 2
        finally:
            await asyncio.gather(*(p.aclose() for p in providers.values()))

    asyncio.run(go())


# --- the concurrency slots' hand-over ------------------------------------------------------------


def test_a_slot_handed_to_a_waiter_cancelled_at_that_moment_goes_back() -> None:
    async def go() -> None:
        slots = _Slots(lambda: 1)
        await slots.acquire()
        waiter = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)  # the waiter is queued
        slots.release()  # the slot is handed over: the waiter's future is resolved...
        waiter.cancel()  # ...and the waiter cancelled before it could run
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert slots._in_use == 0  # the handed-over slot was released, not leaked
        await asyncio.wait_for(slots.acquire(), timeout=5)

    asyncio.run(go())


def test_a_waiter_cancelled_in_the_queue_leaves_it_and_others_go_in_order() -> None:
    async def go() -> None:
        slots = _Slots(lambda: 1)
        await slots.acquire()
        order: list[str] = []

        async def take(name: str) -> None:
            await slots.acquire()
            order.append(name)
            slots.release()

        first = asyncio.create_task(take("first"))
        gone = asyncio.create_task(take("gone"))
        last = asyncio.create_task(take("last"))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert len(slots._waiters) == 2
        slots.release()
        await asyncio.wait_for(asyncio.gather(first, last), timeout=5)
        assert order == ["first", "last"] and slots._in_use == 0

    asyncio.run(go())


def test_a_gate_ends_a_run_of_429s_only_on_success() -> None:
    """Local and shared limits share one gate: a call that failed otherwise (a 500, a dead
    batch worker) neither slows the provider down nor resets the backoff of a run of 429s."""

    async def go() -> list[float]:
        now = [100.0]
        gate = LimitGate(Limits(max_concurrency=1), clock=lambda: now[0])
        pauses: list[float] = []
        for ending in (True, None, True, False, True):
            await gate.admit(0)
            gate.finish(0, None, None, ending)
            if ending:
                pauses.append(gate.slow_down.paused_until - now[0])
                now[0] = gate.slow_down.paused_until
        return pauses

    first, after_a_failure, after_a_success = asyncio.run(go())
    assert after_a_failure == 2 * first and after_a_success == first
    assert outcome(RateLimited("429", retry_after=3)) == (3, True)
    assert outcome(RuntimeError("500")) == (None, None)
    assert outcome(None) == (None, False)
