"""Fault injection against the fake server: every upstream failure mode MoA multiplies."""

from __future__ import annotations

import asyncio
import email.utils
import time
from typing import cast

import pytest

from moa import AggregatorFailed, BudgetExceeded, LayerFailed, MoA, RunResult
from moa.providers.base import estimate_text_tokens
from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import MoAMaker, agents

Q = "Summarise the causes of the French Revolution."


def run(moa: MoA, prompt: str = Q) -> RunResult:
    return moa.run(prompt)


# --- retries ----------------------------------------------------------------------------------


def test_500_500_200_succeeds_on_the_third_attempt(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("p1", Reply(status=500), Reply(status=502))
    result = run(make_moa(proposers=agents("p1"), aggregator={"model": "agg"}))
    (p1,) = result.layers[0].agents
    assert p1.ok and p1.attempts == 3
    assert len(fake.requests_for("p1")) == 3


def test_429_retry_after_is_honoured(fake: FakeOpenAIServer, make_moa: MoAMaker) -> None:
    fake.script("p1", Reply(status=429, headers={"Retry-After": "1"}))
    result = run(make_moa(proposers=agents("p1"), aggregator={"model": "agg"}))
    first, second = fake.requests_for("p1")
    waited = second.started - (first.ended or 0)
    # Never sooner than asked; the upper bound only says "not something else entirely". Exact
    # waits are asserted in virtual time (tests/test_calls.py), where load cannot stretch them.
    assert 0.9 <= waited < 10
    assert result.layers[0].agents[0].attempts == 2


def test_retry_after_ms_and_http_date_are_understood(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    # 700 ms: longer than the first backoff (0.25-0.5 s) could be, so the header made the wait.
    fake.script("p1", Reply(status=429, headers={"retry-after-ms": "700"}))
    fake.script("p2", Reply(status=503, headers={"Retry-After": when}))
    # wait: all, or the straggler cut-off would end p2's wait once p1 has answered.
    run(make_moa(proposers=agents("p1", "p2"), aggregator={"model": "agg"}, wait="all"))
    a, b = fake.requests_for("p1")
    assert 0.65 <= b.started - (a.ended or 0) < 10
    c, d = fake.requests_for("p2")
    assert 0.9 <= d.started - (c.ended or 0) < 10  # HTTP dates have one-second resolution


def test_retry_after_beyond_the_cap_is_not_waited_for(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("slow", Reply(status=429, headers={"Retry-After": "3600"}))
    started = time.monotonic()
    result = run(
        make_moa(proposers=agents("slow", "p2"), aggregator={"model": "agg"}, max_retry_wait=5)
    )
    assert time.monotonic() - started < 4.5  # not max_retry_wait=5, let alone the hour
    slow = result.layers[0].agents[0]
    assert slow.status == "failed" and "3600" in (slow.error or "")
    assert len(fake.requests_for("slow")) == 1
    assert result.output == "agg answer 0"  # the layer went on without it


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_not_retried(
    fake: FakeOpenAIServer, make_moa: MoAMaker, status: int
) -> None:
    fake.script("p1", Reply(status=status))
    result = run(make_moa(proposers=agents("p1", "p2"), aggregator={"model": "agg"}))
    assert len(fake.requests_for("p1")) == 1
    p1 = result.layers[0].agents[0]
    assert p1.status == "failed" and f"HTTP {status}" in (p1.error or "")


def test_attempts_stop_at_max_attempts(fake: FakeOpenAIServer, make_moa: MoAMaker) -> None:
    fake.script("p1", *[Reply(status=500)] * 5)
    result = run(
        make_moa(proposers=agents("p1", "p2"), aggregator={"model": "agg"}, max_attempts=2)
    )
    assert len(fake.requests_for("p1")) == 2
    assert "gave up after 2 attempts" in (result.layers[0].agents[0].error or "")


# --- malformed answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        Reply(body="<html><body>Bad gateway</body></html>", content_type="text/html"),
        Reply(body='{"choices": [', content_type="application/json"),
        Reply(body='{"id": "x", "object": "chat.completion", "choices": []}'),
    ],
    ids=["html", "invalid-json", "no-choices"],
)
def test_a_malformed_200_is_retried_like_a_5xx(
    fake: FakeOpenAIServer, make_moa: MoAMaker, reply: Reply
) -> None:
    fake.script("p1", reply)
    result = run(make_moa(proposers=agents("p1"), aggregator={"model": "agg"}))
    assert len(fake.requests_for("p1")) == 2
    assert result.layers[0].agents[0].ok


# --- deadlines ----------------------------------------------------------------------------------


def test_a_hung_proposer_is_cancelled_at_its_deadline_and_the_layer_goes_on(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("hung", Reply(hang=30))
    moa = make_moa(
        proposers=[{"model": "hung", "timeout": 1.0, "max_attempts": 1}, {"model": "p2"}],
        aggregator={"model": "agg"},
    )
    started = time.monotonic()
    result = run(moa)
    assert time.monotonic() - started < 10  # not the 30 s hang (exact: tests/test_calls.py)
    hung = result.layers[0].agents[0]
    assert hung.status == "failed" and "timeout" in (hung.error or "")
    assert 1.0 <= hung.latency_s < 10
    (request,) = fake.requests_for("hung")
    deadline = time.monotonic() + 2
    while not request.disconnected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request.disconnected  # the connection was closed, not left hanging
    assert "p2 answer 0" in fake.requests_for("agg")[0].text
    assert "hung" not in fake.requests_for("agg")[0].text


def test_layer_timeout_moves_on_once_min_ok_answers_are_in(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("slow", Reply(hang=30))
    moa = make_moa(
        proposers=agents("fast1", "fast2", "slow"), aggregator={"model": "agg"}, layer_timeout=0.8
    )
    started = time.monotonic()
    result = run(moa)
    assert time.monotonic() - started < 10  # not the 30 s hang (exact: tests/test_calls.py)
    statuses = [a.status for a in result.layers[0].agents]
    assert statuses == ["ok", "ok", "cancelled"]


def test_first_token_timeout_applies_to_streamed_calls(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("agg", Reply(latency=5))
    moa = make_moa(
        proposers=agents("p1"),
        aggregator={"model": "agg", "first_token_timeout": 0.5, "max_attempts": 1},
    )
    started = time.monotonic()
    with pytest.raises(AggregatorFailed, match="first token"):
        run(moa)
    assert time.monotonic() - started < 4.5  # not the 5 s latency


# --- k-of-n layers and what later layers see ------------------------------------------------------


def test_empty_null_and_whitespace_answers_are_never_shown(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("empty", Reply(text=""))
    fake.script("null", Reply(null_content=True))
    fake.script("blank", Reply(text="  \n\t "))
    moa = make_moa(proposers=agents("empty", "null", "blank", "good"), aggregator={"model": "agg"})
    result = run(moa)
    assert [a.status for a in result.layers[0].agents] == ["empty", "empty", "empty", "ok"]
    system = fake.requests_for("agg")[0].messages[0]["content"]
    assert "good answer 0" in system
    assert "None" not in system and "candidate 2" not in system


def test_failures_are_not_shown_as_references(fake: FakeOpenAIServer, make_moa: MoAMaker) -> None:
    fake.script("bad", Reply(status=401, body='{"error": {"message": "Invalid key sk-leak"}}'))
    run(make_moa(proposers=agents("bad", "good"), aggregator={"model": "agg"}))
    text = fake.requests_for("agg")[0].text
    assert "Invalid key" not in text and "401" not in text and "Error" not in text


def test_all_proposers_failing_raises_a_typed_error_and_skips_the_aggregator(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("p1", Reply(status=401))
    fake.script("p2", Reply(status=404))
    moa = make_moa(proposers=agents("p1", "p2"), aggregator={"model": "agg"})
    with pytest.raises(LayerFailed) as caught:
        run(moa)
    error = caught.value
    assert error.layer == 1 and error.min_ok == 1
    assert [r.model for r in error.results] == ["p1", "p2"]
    assert "HTTP 401" in str(error) and "HTTP 404" in str(error)
    assert fake.requests_for("agg") == []
    assert error.result is not None and error.result.ok is False


def test_min_ok_is_enforced_and_the_layer_stops_once_it_is_out_of_reach(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("p1", Reply(status=400))
    fake.script("p2", Reply(latency=5))
    fake.script("p3", Reply(latency=5))
    moa = make_moa(proposers=agents("p1", "p2", "p3"), aggregator={"model": "agg"}, min_ok=3)
    started = time.monotonic()
    with pytest.raises(LayerFailed, match="of 3 agents succeeded, 3 needed") as caught:
        run(moa)
    assert time.monotonic() - started < 4.5  # no waiting for answers that cannot help (5 s)
    assert [r.status for r in caught.value.results] == ["failed", "cancelled", "cancelled"]
    assert fake.requests_for("agg") == []


# --- aggregator ---------------------------------------------------------------------------------


def test_aggregator_fallbacks_are_tried_in_order(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("agg", Reply(status=400))
    fake.script("fb1", Reply(status=401))
    moa = make_moa(
        proposers=agents("p1"),
        aggregator={"model": "agg", "fallbacks": agents("fb1", "fb2")},
    )
    result = run(moa)
    assert result.output == "fb2 answer 0"
    assert [a.model for a in result.aggregator_attempts] == ["agg", "fb1", "fb2"]
    assert "p1 answer 0" in fake.requests_for("fb2")[0].text


def test_a_stream_cut_midway_in_the_aggregator_is_an_error_with_the_partial_text(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("agg", Reply(text="The answer is forty-two and here is why", cut_after_chunks=2))
    moa = make_moa(proposers=agents("p1"), aggregator={"model": "agg", "fallbacks": agents("fb")})
    with pytest.raises(AggregatorFailed) as caught:
        run(moa)
    assert caught.value.partial == "The answer is fo"
    assert caught.value.result is not None and caught.value.result.ok is False
    assert caught.value.result.output == "The answer is fo"
    assert fake.requests_for("fb") == []  # text already went out: no silent restart


def test_a_stream_cut_in_a_proposer_fails_that_proposer_only(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    # Nobody is shown a proposer's text here, so a cut is a broken response: retried like a 5xx.
    fake.script("p1", Reply(text="x" * 50, cut_after_chunks=1))
    result = run(make_moa(proposers=agents("p1", "p2"), aggregator={"model": "agg"}))
    assert result.layers[0].agents[0].attempts == 2 and result.layers[0].agents[0].ok


def test_a_stream_that_dies_before_any_text_falls_back(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("agg", Reply(text="never sent", cut_after_chunks=0))
    moa = make_moa(
        proposers=agents("p1"),
        aggregator={"model": "agg", "max_attempts": 1, "fallbacks": agents("fb")},
    )
    assert run(moa).output == "fb answer 0"


# --- context budget -------------------------------------------------------------------------------


def test_oversized_references_are_trimmed_fairly_to_fit(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("long1", Reply(text="A" * 30_000))
    fake.script("long2", Reply(text="B" * 30_000))
    fake.script("short", Reply(text="short and sweet"))
    moa = make_moa(
        proposers=agents("long1", "long2", "short"),
        aggregator={"model": "agg", "context_window": 4096, "max_tokens": 512},
    )
    result = run(moa)
    (request,) = fake.requests_for("agg")
    system = request.messages[0]["content"]
    assert "short and sweet" in system  # the short answer stays whole
    assert system.count("cut to fit the context window") == 2
    a, b = system.count("A"), system.count("B")
    assert abs(a - b) < 50 and a > 1000  # equal shares, each keeps its head
    from moa.providers.base import ChatMessage, estimate_tokens

    assert estimate_tokens(cast(list[ChatMessage], request.messages)) + 512 <= 4096
    assert result.aggregator.references_trimmed


def test_a_context_length_400_halves_the_references_and_retries_once(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    overflow = Reply(
        status=400,
        body='{"error": {"message": "This model\'s maximum context length is 8192 tokens",'
        ' "code": "context_length_exceeded"}}',
    )
    fake.script("p1", Reply(text="word " * 2000))
    fake.script("agg", overflow)
    result = run(make_moa(proposers=agents("p1"), aggregator={"model": "agg"}))
    first, second = fake.requests_for("agg")
    assert len(second.text) < len(first.text) * 0.7
    assert "cut to fit" in second.text
    assert result.ok


def test_a_second_context_length_400_is_a_clear_error(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    overflow = Reply(status=400, body='{"error": {"code": "context_length_exceeded"}}')
    fake.script("agg", overflow, overflow)
    moa = make_moa(proposers=agents("p1"), aggregator={"model": "agg"})
    with pytest.raises(AggregatorFailed, match="does not fit even with the references halved"):
        run(moa)
    assert len(fake.requests_for("agg")) == 2


# --- budget and usage ----------------------------------------------------------------------


def test_max_total_tokens_stops_the_run_before_a_call_would_exceed_it(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    moa = make_moa(
        proposers=agents("p1", "p2"),
        aggregator={"model": "agg"},
        max_tokens=100,
        max_total_tokens=250,
    )
    with pytest.raises(BudgetExceeded, match="max_total_tokens=250"):
        run(moa)
    assert fake.requests_for("agg") == []


def test_usage_counts_every_attempt_including_failed_ones(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("p1", Reply(status=500), Reply(text="ok", usage=(7, 1)))
    fake.script("agg", Reply(text="a partial answer that breaks", cut_after_chunks=2))
    moa = make_moa(proposers=agents("p1"), aggregator={"model": "agg"})
    with pytest.raises(AggregatorFailed) as caught:
        run(moa)
    result = caught.value.result
    assert result is not None
    p1 = result.layers[0].agents[0]
    assert p1.attempts == 2 and p1.usage.prompt_tokens == 7
    aggregator = result.aggregator_attempts[0]
    # The broken stream still generated (and billed) tokens: they are counted (estimated, as
    # nothing reported them).
    assert aggregator.output == "a partial answer"
    assert aggregator.usage.completion_tokens == estimate_text_tokens(aggregator.output)
    assert aggregator.usage.prompt_tokens > 0
    assert result.usage == p1.usage + aggregator.usage


def test_concurrent_runs_share_nothing(fake: FakeOpenAIServer, make_moa: MoAMaker) -> None:
    moa = make_moa(proposers=agents("p1", "p2"), aggregator={"model": "agg"})

    async def main() -> list[str]:
        results = await asyncio.gather(*(moa.arun(f"question {i}") for i in range(5)))
        return [r.output for r in results]

    outputs = asyncio.run(main())
    assert sorted(outputs) == sorted(f"agg answer {i}" for i in range(5))
    for request in fake.requests_for("agg"):
        question = request.messages[-1]["content"]
        assert question.startswith("question ")


@pytest.mark.parametrize("status", [408, 409, 429, 500, 503])
def test_transient_statuses_are_retried(
    fake: FakeOpenAIServer, make_moa: MoAMaker, status: int
) -> None:
    fake.script("p1", Reply(status=status))
    result = run(make_moa(proposers=agents("p1"), aggregator={"model": "agg"}))
    assert result.layers[0].agents[0].ok and result.layers[0].agents[0].attempts == 2


def test_a_refused_connection_is_retried_then_reported(fake: FakeOpenAIServer) -> None:
    from moa import parse_config

    config = parse_config(
        {
            "providers": {
                "fake": {"base_url": fake.base_url},
                "down": {"base_url": "http://127.0.0.1:9/v1"},  # the discard port: nothing listens
            },
            "proposers": [{"provider": "down", "model": "x"}, {"provider": "fake", "model": "p"}],
            "aggregator": {"provider": "fake", "model": "agg"},
            "max_attempts": 2,
        }
    )
    with MoA.from_config(config) as moa:
        result = moa.run(Q)
    down = result.layers[0].agents[0]
    assert down.status == "failed" and down.attempts == 2
    assert "connection failed" in (down.error or "")
    assert result.output == "agg answer 0"


def test_error_messages_and_bodies_never_carry_a_registered_key() -> None:
    from moa.env import Environment
    from moa.errors import ProviderStatusError

    key = Environment({"K": "sk-live-0123456789abcdef"}).api_key("K", "p")
    error = ProviderStatusError(f"HTTP 401: bad key {key}", status_code=401, body=f'"{key}"')
    assert key not in str(error) and key not in (error.body or "") and key not in repr(error)
    assert "***" in str(error)
