"""Hedged calls: a second identical request when the first is slow; the first to stream wins."""

from __future__ import annotations

import asyncio
import time
from typing import cast

import pytest

from moa import AgentTextDelta, ConfigError, Done, MoA, Usage, parse_config
from moa.providers.base import ChatMessage, estimate_tokens
from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import MoAMaker, agents

Q = "Why do ships float?"


def _disconnected(request: object) -> bool:
    deadline = time.monotonic() + 2
    while not request.disconnected and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.05)
    return bool(request.disconnected)  # type: ignore[attr-defined]


def test_a_slow_start_sends_a_hedge_which_wins_and_both_are_counted(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script(
        "p1",
        Reply(latency=3.0, text="the slow primary"),
        Reply(text="Buoyancy: they displace their weight in water.", usage=(40, 9)),
    )
    moa = make_moa(proposers=[{"model": "p1", "hedge_after": 0.3}], aggregator={"model": "agg"})
    result = moa.run(Q)
    (p1,) = result.layers[0].agents
    assert p1.ok and p1.hedge == "hedge" and p1.attempts == 1
    assert p1.output == "Buoyancy: they displace their weight in water."
    primary, hedge = fake.requests_for("p1")
    assert primary.body["messages"] == hedge.body["messages"]  # an identical request
    assert _disconnected(primary)  # the loser was cancelled, its connection closed
    # Winner: its reported usage. Loser: its prompt (sent and read), no completion tokens.
    assert p1.usage == Usage(40 + estimate_tokens(cast(list[ChatMessage], primary.messages)), 9)
    assert p1.to_dict()["hedge"] == "hedge"


def test_a_primary_that_starts_first_wins_and_the_hedge_is_cancelled(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("p1", Reply(latency=0.6, text="primary answer"), Reply(latency=5, text="hedge"))
    moa = make_moa(proposers=[{"model": "p1", "hedge_after": 0.2}], aggregator={"model": "agg"})
    (p1,) = moa.run(Q).layers[0].agents
    assert p1.hedge == "primary" and p1.output == "primary answer"
    _, hedge = fake.requests_for("p1")
    assert _disconnected(hedge)


def test_no_hedge_when_the_first_token_comes_in_time(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    moa = make_moa(proposers=[{"model": "p1", "hedge_after": 2}], aggregator={"model": "agg"})
    (p1,) = moa.run(Q).layers[0].agents
    assert p1.ok and p1.hedge is None and "hedge" not in p1.to_dict()
    assert len(fake.requests_for("p1")) == 1


def test_a_primary_failing_while_the_hedge_runs_leaves_the_answer_to_the_hedge(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("p1", Reply(latency=0.5, status=500), Reply(latency=0.6, text="from the hedge"))
    moa = make_moa(
        proposers=[{"model": "p1", "hedge_after": 0.2, "max_attempts": 1}],
        aggregator={"model": "agg"},
    )
    (p1,) = moa.run(Q).layers[0].agents
    assert p1.ok and p1.hedge == "hedge" and p1.output == "from the hedge"


def test_the_hedge_may_go_to_another_provider_and_the_aggregator_streams_only_the_winner(
    fake: FakeOpenAIServer,
) -> None:
    with FakeOpenAIServer() as other:
        fake.script("agg", Reply(latency=3.0, text="slow primary text"))
        other.script("agg", Reply(text="The hedge's answer, streamed."))
        config = parse_config(
            {
                "providers": {
                    "fake": {"base_url": fake.base_url},
                    "other": {"base_url": other.base_url},
                },
                "proposers": [{"provider": "fake", "model": "p1"}],
                "aggregator": {
                    "provider": "fake",
                    "model": "agg",
                    "hedge_after": 0.3,
                    "hedge_provider": "other",
                },
            }
        )

        async def main() -> list[object]:
            async with MoA.from_config(config) as moa:
                return [e async for e in moa.stream(Q, agent_text=True)]

        events = asyncio.run(main())
        done = events[-1]
        assert isinstance(done, Done)
        assert done.result.output == "The hedge's answer, streamed."
        assert done.result.aggregator.hedge == "hedge"
        texts = [e.text for e in events if isinstance(e, AgentTextDelta) and e.layer == 2]
        assert "".join(texts) == "The hedge's answer, streamed."
        assert len(other.requests_for("agg")) == 1
        assert _disconnected(fake.requests_for("agg")[0])


def test_an_unknown_hedge_provider_is_one_clear_line(fake: FakeOpenAIServer) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "providers": {"fake": {"base_url": fake.base_url}},
                "proposers": agents("p1", hedge_after=1, hedge_provider="nope"),
                "aggregator": {"model": "agg"},
            }
        )
    assert "hedge_provider 'nope' is not under 'providers' (known: fake)" in str(caught.value)
