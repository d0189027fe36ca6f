"""The core's calls, retries, deadlines and budget on an in-process provider, in virtual time.

`ScriptedProvider` answers as scripted without HTTP, and `run_virtual` runs the event loop on a
clock that jumps to the next timer, so waits are exact: a retry after `Retry-After: 1` waited
1.0 s of loop time, whatever the machine was doing. (tests/test_faults.py proves the same
behaviours over real HTTP.)
"""

from __future__ import annotations

import asyncio
import math

import pytest

from moa import AggregatorFailed, BudgetExceeded, Done, MoA, TextDelta
from moa.budget import RunBudget
from moa.calls import AgentCall, call_agent
from moa.config import Agent
from moa.errors import (
    ContextLengthExceeded,
    ProviderConnectionError,
    ProviderStatusError,
    RateLimited,
)
from moa.providers.base import StreamChunk, estimate_text_tokens, estimate_tokens
from moa.providers.collect import StreamCollector
from moa.results import AgentResult, RunResult, TokenLogprob, Usage
from moa.retry import BACKOFF_BASE_S, BACKOFF_CAP_S, backoff, decide_retry
from moa.runaway import RUNAWAY_FINISH
from moa.testing import Answer, ScriptedProvider, run_virtual
from tests.conftest import agents, scripted_moa

Q = "Why is the sky blue?"
LOOP = "The sky is blue because the sky is blue, as I said. " * 12


def _moa(provider: ScriptedProvider, **pipeline: object) -> MoA:
    pipeline.setdefault("proposers", agents("p1", "p2"))
    pipeline.setdefault("aggregator", {"model": "agg"})
    return scripted_moa({"fake": provider}, **pipeline)


def _timed(moa: MoA, prompt: str = Q) -> tuple[RunResult, float]:
    """The run's result and how long it took on the loop's (virtual) clock."""

    async def go() -> tuple[RunResult, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await moa.arun(prompt)
        return result, loop.time() - started

    return run_virtual(go())


def _fails(moa: MoA, error: type[Exception]) -> tuple[Exception, float]:
    async def go() -> tuple[Exception, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(error) as caught:
            await moa.arun(Q)
        return caught.value, loop.time() - started

    return run_virtual(go())


def _status(code: int) -> ProviderStatusError:
    return ProviderStatusError(f"HTTP {code}: no", status_code=code, provider="fake", model="m")


# --- the retry policy, as a unit ------------------------------------------------------------------


def test_backoff_doubles_from_its_base_up_to_its_cap() -> None:
    assert [backoff(n) for n in (1, 2, 3)] == [
        BACKOFF_BASE_S,
        2 * BACKOFF_BASE_S,
        4 * BACKOFF_BASE_S,
    ]
    assert backoff(50) == BACKOFF_CAP_S


@pytest.mark.parametrize("attempt", [1, 2, 3, 7])
def test_decide_retry_waits_between_half_and_all_of_the_backoff(attempt: int) -> None:
    error = _status(503)
    for _ in range(200):
        decision = decide_retry(error, attempt=attempt, max_attempts=9, max_retry_wait=60)
        assert decision.retry
        assert backoff(attempt) / 2 <= decision.wait_s <= backoff(attempt)


def test_decide_retry_never_waits_longer_than_max_retry_wait() -> None:
    decision = decide_retry(_status(500), attempt=8, max_attempts=9, max_retry_wait=0.3)
    assert decision.retry and decision.wait_s <= 0.3


def test_decide_retry_obeys_retry_after_exactly_unless_it_is_too_long() -> None:
    asked = RateLimited("busy", retry_after=2.5)
    assert decide_retry(asked, attempt=1, max_attempts=3, max_retry_wait=10).wait_s == 2.5
    refused = decide_retry(asked, attempt=1, max_attempts=3, max_retry_wait=2)
    assert not refused.retry and "exceeds max_retry_wait=2 s" in refused.reason


def test_decide_retry_stops_at_max_attempts_and_for_what_cannot_succeed() -> None:
    last = decide_retry(_status(500), attempt=3, max_attempts=3, max_retry_wait=10)
    assert not last.retry and last.reason == "gave up after 3 attempts"
    for code in (400, 401, 404):
        refused = decide_retry(_status(code), attempt=1, max_attempts=3, max_retry_wait=10)
        assert not refused.retry and refused.reason == "not retryable"


# --- the stream collector -------------------------------------------------------------------------


def test_the_collector_adds_chunks_up_to_one_completion() -> None:
    token = TokenLogprob("a", -0.1)
    collected = StreamCollector()
    for chunk in [
        StreamChunk(text="Hel", logprobs=(token,)),
        StreamChunk(text="lo", logprobs=(token, token)),
        StreamChunk(finish_reason="stop", usage=Usage(5, 2)),
    ]:
        assert collected.add(chunk)
    completion = collected.completion()
    assert completion.text == "Hello" and completion.finish_reason == "stop"
    assert completion.usage == Usage(5, 2) and completion.logprobs == (token,) * 3


def test_the_collector_stops_a_runaway_at_its_first_repeat() -> None:
    collected = StreamCollector(stop_runaways=True)
    read = 0
    for start in range(0, len(LOOP), 8):
        read += 1
        if not collected.add(StreamChunk(text=LOOP[start : start + 8])):
            break
    assert read < len(LOOP) / 8  # it said to stop before the end
    completion = collected.completion()
    assert completion.finish_reason == RUNAWAY_FINISH
    assert LOOP.startswith(completion.text) and completion.text.count("as I said") == 1


# --- retries and deadlines, in virtual time ----------------------------------------------------


def test_500_500_200_backs_off_twice_then_succeeds() -> None:
    provider = ScriptedProvider()
    provider.script("p1", Answer(error=_status(500)), Answer(error=_status(502)))
    result, _ = _timed(_moa(provider, proposers=agents("p1")))
    p1 = result.layers[0].agents[0]
    assert p1.ok and p1.attempts == 3
    first, second, third = provider.calls_for("p1")
    for attempt, (before, after) in enumerate([(first, second), (second, third)], start=1):
        assert before.ended is not None
        waited = after.started - before.ended
        assert backoff(attempt) / 2 <= waited <= backoff(attempt)


def test_retry_after_is_waited_exactly() -> None:
    provider = ScriptedProvider()
    provider.script("p1", Answer(error=RateLimited("busy", retry_after=1)))
    result, elapsed = _timed(_moa(provider, proposers=agents("p1")))
    first, second = provider.calls_for("p1")
    assert first.ended is not None and second.started - first.ended == pytest.approx(1.0)
    assert elapsed == pytest.approx(1.0)
    assert result.layers[0].agents[0].attempts == 2


def test_retry_after_beyond_max_retry_wait_fails_the_call_at_once() -> None:
    provider = ScriptedProvider()
    provider.script("p1", Answer(error=RateLimited("busy", retry_after=3600)))
    result, elapsed = _timed(_moa(provider, max_retry_wait=5))
    p1 = result.layers[0].agents[0]
    assert p1.status == "failed" and p1.failure == "transient" and "3600" in (p1.error or "")
    assert elapsed == 0 and len(provider.calls_for("p1")) == 1


def test_a_hung_agent_is_cut_at_its_timeout_and_the_layer_goes_on() -> None:
    provider = ScriptedProvider()
    provider.script("hung", Answer(delay=math.inf))
    moa = _moa(
        provider,
        proposers=[{"model": "hung", "timeout": 1.5, "max_attempts": 1}, {"model": "p2"}],
        wait="all",
    )
    result, elapsed = _timed(moa)
    hung = result.layers[0].agents[0]
    assert hung.status == "failed" and "timeout=1.5 s" in (hung.error or "")
    assert hung.latency_s == pytest.approx(1.5) and elapsed == pytest.approx(1.5)
    (call,) = provider.calls_for("hung")
    assert call.abandoned and call.ended == pytest.approx(1.5)
    assert "p2 answer 0" in provider.calls_for("agg")[0].text


def test_a_layer_timeout_moves_on_once_min_ok_answers_are_in() -> None:
    provider = ScriptedProvider()
    provider.script("slow", Answer(delay=30))
    moa = _moa(provider, proposers=agents("fast1", "fast2", "slow"), layer_timeout=0.8)
    result, elapsed = _timed(moa)
    assert [a.status for a in result.layers[0].agents] == ["ok", "ok", "cancelled"]
    assert elapsed == pytest.approx(0.8)
    (slow,) = provider.calls_for("slow")
    assert slow.abandoned


def test_the_first_token_timeout_bounds_a_streamed_call() -> None:
    provider = ScriptedProvider()
    provider.script("agg", Answer(delay=5))
    moa = _moa(provider, aggregator={"model": "agg", "first_token_timeout": 0.5, "max_attempts": 1})
    error, elapsed = _fails(moa, AggregatorFailed)
    assert "first token" in str(error) and elapsed == pytest.approx(0.5)


def test_text_resets_the_first_token_timeout_not_the_whole_timeout() -> None:
    provider = ScriptedProvider()
    provider.script("agg", Answer(text="a" * 40, chunk_delay=0.4))  # 5 chunks: 1.6 s in all
    moa = _moa(provider, aggregator={"model": "agg", "first_token_timeout": 0.5})
    result, elapsed = _timed(moa)
    assert result.output == "a" * 40 and elapsed == pytest.approx(1.6)


def test_agents_of_a_layer_run_concurrently() -> None:
    provider = ScriptedProvider(default=Answer(delay=1))
    result, elapsed = _timed(_moa(provider, proposers=agents("p1", "p2", "p3", "p4")))
    assert provider.max_in_flight == 4
    assert elapsed == pytest.approx(2.0)  # one second per layer, not per call
    assert result.output == "agg answer 0"


# --- what a call reports ----------------------------------------------------------------------


def _call(model: str = "m", references: tuple[str, ...] = (), **settings: object) -> AgentCall:
    agent = Agent(provider="fake", model=model, **settings)  # type: ignore[arg-type]
    conversation = [{"role": "user", "content": Q}]
    return AgentCall(agent, conversation, references, layer=1, index=0)  # type: ignore[arg-type]


def _call_agent(
    provider: ScriptedProvider, call: AgentCall, budget: RunBudget, stream: bool = False
) -> AgentResult:
    on_text = (lambda text: None) if stream else None
    return run_virtual(call_agent(provider, call, budget=budget, on_text=on_text))


def test_usage_and_the_budget_agree_whatever_the_attempts_did() -> None:
    provider = ScriptedProvider()
    provider.script(
        "m",
        Answer(error=_status(500)),  # nothing generated: costs nothing
        Answer(text="half of an answer", cut_after_chunks=1),  # 8 characters, then it broke
    )
    budget = RunBudget(None)
    result = _call_agent(provider, _call(), budget, stream=True)
    assert result.status == "failed" and result.output == "half of "
    assert result.attempts == 2
    assert result.usage.completion_tokens == estimate_text_tokens("half of ")
    assert budget.used == result.usage.total_tokens and budget._reserved == 0


def test_an_answer_without_reported_usage_is_estimated() -> None:
    provider = ScriptedProvider(default=Answer(text="forty-two", report_usage=False))
    result = _call_agent(provider, _call(), RunBudget(None))
    assert result.usage.completion_tokens == estimate_text_tokens("forty-two")
    assert result.usage.prompt_tokens > 0


def test_a_cancelled_call_releases_its_reservation_and_counts_its_text() -> None:
    provider = ScriptedProvider(default=Answer(text="x" * 64, chunk_delay=1))
    budget = RunBudget(10_000)
    received: list[str] = []

    async def go() -> None:
        call = _call()
        task = asyncio.create_task(
            call_agent(provider, call, budget=budget, on_text=received.append)
        )
        await asyncio.sleep(2.5)  # chunks at 0, 1 and 2 s have arrived
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_virtual(go())
    assert "".join(received) == "x" * 24
    (call,) = provider.calls
    assert call.abandoned
    assert budget._reserved == 0
    prompt = estimate_tokens(call.request.messages)
    assert budget.used == prompt + estimate_text_tokens("x" * 24)


def test_the_budget_refuses_a_call_that_could_pass_it() -> None:
    provider = ScriptedProvider()
    moa = _moa(provider, max_tokens=100, max_total_tokens=250)
    error, _ = _fails(moa, BudgetExceeded)
    assert "max_total_tokens=250" in str(error)
    assert provider.calls_for("agg") == []


def test_a_runaway_stream_is_cut_and_the_provider_stops_generating() -> None:
    provider = ScriptedProvider(default=Answer(text=LOOP))
    result = _call_agent(provider, _call(), RunBudget(None), stream=True)
    assert result.status == "truncated" and "runaway" in (result.error or "")
    assert result.output.count("as I said") == 1
    (call,) = provider.calls
    assert call.abandoned  # the stream was left: nothing more generated


def test_a_context_length_refusal_halves_the_references_once() -> None:
    provider = ScriptedProvider()
    overflow = ContextLengthExceeded("too long", status_code=400)
    provider.script("m", Answer(error=overflow), Answer(error=overflow))
    references = ("word " * 400, "other " * 400)
    result = _call_agent(provider, _call(references=references), RunBudget(None))
    assert result.failure == "context_length" and "halved" in (result.error or "")
    first, second = provider.calls
    assert len(second.text) < len(first.text) * 0.7


def test_a_connection_error_is_retried_then_reported() -> None:
    provider = ScriptedProvider()
    refused = ProviderConnectionError("connection failed", provider="fake", model="m")
    provider.script("m", Answer(error=refused), Answer(error=refused))
    result = _call_agent(provider, _call(max_attempts=2), RunBudget(None))
    assert result.status == "failed" and result.attempts == 2
    assert result.failure == "transient" and "connection failed" in (result.error or "")


# --- nested pipelines -------------------------------------------------------------------------


def test_a_pipeline_nested_as_an_aggregator_streams_through_its_provider() -> None:
    inner_provider = ScriptedProvider("inner-fake")
    inner_provider.script("inner-agg", Answer(text="The nested answer, in several chunks."))
    inner = scripted_moa(
        {"inner-fake": inner_provider},
        proposers=agents("i1", "i2"),
        aggregator={"model": "inner-agg"},
    )
    outer_provider = ScriptedProvider("fake")
    outer = scripted_moa(
        {"fake": outer_provider, "nested": inner.as_provider("nested")},
        proposers=agents("p1", provider="fake"),
        aggregator={"provider": "nested", "model": "-"},
    )

    async def go() -> list[object]:
        return [event async for event in outer.stream(Q)]

    events = run_virtual(go())
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert len(deltas) > 1 and "".join(deltas) == "The nested answer, in several chunks."
    done = events[-1]
    assert isinstance(done, Done)
    inner_calls = inner_provider.calls
    assert sorted(c.model for c in inner_calls) == ["i1", "i2", "inner-agg"]
    # The inner pipeline's whole run is the outer aggregator's usage.
    texts = {"i1": "i1 answer 0", "i2": "i2 answer 0", "inner-agg": "".join(deltas)}
    inner_usage = sum(
        (
            Usage(estimate_tokens(c.request.messages), estimate_text_tokens(texts[c.model]))
            for c in inner_calls
        ),
        Usage(),
    )
    assert done.result.aggregator.usage == inner_usage
    # The outer layer's answer reached the inner pipeline as the question's context.
    assert all("p1 answer 0" in c.text for c in inner_calls if c.model != "inner-agg")
    assert inner_calls[-1].stream
