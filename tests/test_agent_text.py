"""Per-agent text events (`MoA.stream(..., agent_text=True)`) and `moa ask --show-agents`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from moa import AgentFinished, AgentStarted, AgentTextDelta, Done, MoA, TextDelta
from moa.results import Event
from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import MoAMaker, agents
from tests.test_cli import moa as moa_cli

QUESTION = "Name three primary colours."


@pytest.fixture
def config(fake: FakeOpenAIServer, tmp_path: Path) -> Path:
    path = tmp_path / "moa.yaml"
    path.write_text(
        f"providers: {{fake: {{base_url: '{fake.base_url}'}}}}\n"
        "proposers: [{model: p1}, {model: p2}]\naggregator: {model: agg}\n"
    )
    return path


def _collect(moa: MoA, *, agent_text: bool) -> list[Event]:
    async def collect() -> list[Event]:
        return [event async for event in moa.stream(QUESTION, agent_text=agent_text)]

    return asyncio.run(collect())


def test_every_agent_streams_its_text_between_its_start_and_its_finish(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("p1", Reply(text="Red, green and blue, for light."))
    fake.script("p2", Reply(text="Red, yellow and blue, for paint."))
    fake.script("agg", Reply(text="For light: red, green, blue. For paint: red, yellow, blue."))
    moa = make_moa(proposers=agents("p1", "p2"), aggregator={"model": "agg"}, layers=3)
    events = _collect(moa, agent_text=True)

    done = events[-1]
    assert isinstance(done, Done)
    result = done.result
    for agent in [*result.calls]:
        key = (agent.layer, agent.index)
        started = next(
            i
            for i, e in enumerate(events)
            if isinstance(e, AgentStarted) and (e.layer, e.index) == key
        )
        finished = next(
            i
            for i, e in enumerate(events)
            if isinstance(e, AgentFinished) and (e.result.layer, e.result.index) == key
        )
        deltas = [
            (i, e)
            for i, e in enumerate(events)
            if isinstance(e, AgentTextDelta) and (e.layer, e.index) == key
        ]
        assert len(deltas) > 1, key  # streamed in pieces, not handed over at the end
        assert all(started < i < finished for i, _ in deltas)
        assert "".join(e.text for _, e in deltas) == agent.output
    # The aggregator's text comes both ways, piece for piece.
    aggregator = [e.text for e in events if isinstance(e, AgentTextDelta) and e.layer == 3]
    assert aggregator == [e.text for e in events if isinstance(e, TextDelta)]
    assert "".join(aggregator) == result.output
    assert all(r.stream for r in fake.requests)


def test_without_agent_text_no_agent_deltas_and_proposers_stream_only_for_the_cut_off(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    moa = make_moa(proposers=agents("p1", "p2"), aggregator={"model": "agg"})
    events = _collect(moa, agent_text=False)
    assert not any(isinstance(e, AgentTextDelta) for e in events)
    # The straggler cut-off listens to the proposers' streams, to tell a hung one from a slow.
    assert [r.stream for r in fake.requests_for("p1") + fake.requests_for("p2")] == [True, True]
    assert fake.requests_for("agg")[0].stream
    fake.reset()
    moa = make_moa(proposers=agents("p1", "p2"), aggregator={"model": "agg"}, wait="all")
    _collect(moa, agent_text=False)
    assert [r.stream for r in fake.requests_for("p1") + fake.requests_for("p2")] == [False, False]


def test_a_proposer_cut_midway_streams_its_part_then_fails_and_stays_out_of_the_references(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("p1", Reply(text="The primary colours are", cut_after_chunks=2))
    fake.script("p2", Reply(text="Red, yellow and blue."))
    moa = make_moa(proposers=agents("p1", "p2"), aggregator={"model": "agg"})
    events = _collect(moa, agent_text=True)

    partial = "".join(
        e.text for e in events if isinstance(e, AgentTextDelta) and (e.layer, e.index) == (1, 0)
    )
    assert partial == "The primary colours are"[:16]  # two chunks of the fake's 8 characters
    (p1,) = [e.result for e in events if isinstance(e, AgentFinished) and e.result.model == "p1"]
    assert p1.status == "failed" and p1.output == partial
    done = events[-1]
    assert isinstance(done, Done) and done.result.ok
    (aggregator,) = fake.requests_for("agg")
    assert "Red, yellow and blue." in aggregator.text
    assert partial not in aggregator.text


def test_ask_show_agents_prints_each_proposers_lines_on_stderr(
    fake: FakeOpenAIServer, config: Path
) -> None:
    fake.script("p1", Reply(text="first line of p1\nsecond line of p1"))
    fake.script("p2", Reply(text="only line of p2"))
    fake.script("agg", Reply(text="The answer."))
    done = moa_cli("ask", "--config", str(config), "--show-agents", "q?")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "The answer.\n"
    lines = done.stderr.splitlines()
    assert "[layer 1 · fake/p1#0] first line of p1" in lines
    assert "[layer 1 · fake/p1#0] second line of p1" in lines
    assert "[layer 1 · fake/p2#1] only line of p2" in lines
    assert "The answer." not in done.stderr
