"""The runaway guard: a generation repeating itself is cut at its first repeat, streamed or not."""

from __future__ import annotations

import asyncio
import time

import pytest

from moa import TextDelta
from moa.runaway import RunawayGuard, find_runaway
from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import MoAMaker, agents

LOOP = (
    "This is not just a simple answer, but a multi-answer that can be combined to create a "
    "single answer. "
)
OPENING = "Several models answering together see more sides of a question. "


def test_a_long_span_repeated_over_and_over_is_cut_at_its_first_repeat() -> None:
    text = OPENING + LOOP * 6
    found = find_runaway(text)
    assert found is not None
    assert text[: found.keep] == (OPENING + LOOP).rstrip()
    assert found.period == len(LOOP) and found.copies == 6


def test_a_loop_caught_mid_copy_keeps_one_whole_copy() -> None:
    text = OPENING + LOOP * 3 + LOOP[:37]
    found = find_runaway(text)
    assert found is not None
    assert text[: found.keep] == (OPENING + LOOP).rstrip()


def test_the_cut_ends_at_the_nearest_sentence_end() -> None:
    loop = "The first idea is good. The second idea is better. "
    found = find_runaway("Intro. " + loop * 5)
    assert found is not None
    assert ("Intro. " + loop * 5)[: found.keep] == "Intro. " + loop.rstrip()


def test_short_spans_count_once_long_enough_and_tiny_units_never() -> None:
    assert find_runaway("I am sorry. " * 10) is None  # 120 characters
    found = find_runaway("Well. " + "I am sorry. " * 20)
    assert found is not None and found.period == 12
    for degenerate in ("A" * 30_000, "ha " * 200, "-=" * 500):
        assert find_runaway(degenerate) is None


@pytest.mark.parametrize(
    "text",
    [
        OPENING * 2,  # one repeat is not "over and over"
        LOOP * 2 + "And then something else entirely, which is how answers usually go on.",
        "\n".join(f"| {n} | {n * n} | {n * n * n} |" for n in range(1, 40)),  # a table
        "Step 1: mix.\nStep 2: stir.\nStep 3: bake.\n" * 2,
        "- " * 60,  # under 200 characters
        "",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert find_runaway(text) is None


def test_the_streaming_guard_notices_a_loop_soon_after_it_begins() -> None:
    guard = RunawayGuard()
    text = OPENING + LOOP * 20
    fed = 0
    found = None
    while found is None and fed < len(text):
        found = guard.feed(text[fed : fed + 5])
        fed += 5
    assert found is not None
    assert fed <= len(OPENING) + 3 * len(LOOP) + 30  # the third copy, plus one look's delay
    assert text[: found.keep] == (OPENING + LOOP).rstrip()


def test_a_looping_proposer_is_cut_and_marked_truncated_before_the_next_layer(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("p1", Reply(text=OPENING + LOOP * 8))
    moa = make_moa(proposers=agents("p1", "p2"), aggregator={"model": "agg"})
    result = moa.run("Why do several models beat one?")
    looped = result.layers[0].agents[0]
    assert looped.status == "truncated" and looped.ok
    assert looped.output == (OPENING + LOOP).rstrip()
    assert looped.error is not None and "runaway" in looped.error and "repeated" in looped.error
    (aggregator,) = fake.requests_for("agg")
    assert aggregator.text.count(LOOP.strip()) == 1


def test_a_looping_streamed_answer_is_stopped_early(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("agg", Reply(text=OPENING + LOOP * 60, chunk_delay=0.005))
    moa = make_moa(proposers=agents("p1"), aggregator={"model": "agg"})

    async def collect() -> list[object]:
        return [event async for event in moa.stream("Why do several models beat one?")]

    events = asyncio.run(collect())
    result = events[-1].result  # type: ignore[attr-defined]
    assert result.output == (OPENING + LOOP).rstrip()
    assert result.aggregator.status == "truncated"
    assert "runaway" in (result.aggregator.error or "")
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
    # What went out before the guard saw the loop: a few copies, not sixty.
    assert LOOP * 2 in streamed and len(streamed) < len(OPENING) + 5 * len(LOOP)
    # The guard hung up: the server did not send the rest (it notices a moment later).
    (request,) = fake.requests_for("agg")
    deadline = time.monotonic() + 10
    while request.ended is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert request.disconnected
