"""Staircase streaming: the aggregator writes in steps while the last proposer layer streams."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from moa import AgentFinished, AgentStarted, AgentTextDelta, Done, MoA, TextDelta, parse_config
from moa.continuation import CONTINUE_INSTRUCTION, WordGate, join_continuation
from moa.results import Event
from moa.testing import FakeOpenAIServer, Reply

Q = "How do tides work?"
P1 = "The Moon pulls on the oceans, raising a bulge on the near side of the Earth."
P2 = "A second bulge forms on the far side, so most coasts see two high tides a day."
TARGET = (
    "Tides come from the Moon's pull: one bulge faces the Moon and another sits opposite, "
    "so a coast passes through two high tides and two low tides every lunar day."
)


def _partial_answer(body: dict[str, Any]) -> str:
    """The answer so far that a step asks to continue ("" for the first step)."""
    messages = body["messages"]
    if messages[-1]["role"] == "assistant":
        return str(messages[-1]["content"])
    if messages[-1]["content"] == CONTINUE_INSTRUCTION:
        return str(messages[-2]["content"])
    return ""


def _writer(*, repeat_tail: bool = False, delay: float = 0.05):  # type: ignore[no-untyped-def]
    """An aggregator that writes TARGET, continuing from whatever answer it is given, about
    four characters per token, so a step usually ends inside a word. With `repeat_tail` it
    behaves like a chat model asked to go on: it repeats the end of the answer first and
    drops the space."""

    def respond(body: dict[str, Any], n: int) -> Reply:
        partial = _partial_answer(body)
        assert TARGET.startswith(partial), partial
        rest = TARGET[len(partial) :]
        piece = rest[: body["max_tokens"] * 4]
        done = len(piece) == len(rest)
        if repeat_tail and partial:
            piece = partial[-12:] + piece.lstrip()
        # As slow as a real model, so that the steps overlap the proposers' streams.
        return Reply(text=piece, finish_reason="stop" if done else "length", chunk_delay=delay)

    return respond


def _config(fake: FakeOpenAIServer, *, continuation: str | None = None, **more: Any) -> Any:
    provider: dict[str, Any] = {"base_url": fake.base_url}
    if continuation:
        provider["continuation"] = continuation
    data: dict[str, Any] = {
        "providers": {"fake": provider},
        "proposers": [{"model": "p1"}, {"model": "p2"}],
        "aggregator": {
            "model": "agg",
            "mode": "staircase",
            "step_tokens": 5,
            "step_growth": 1,
            "max_tokens": 200,
        },
    }
    data.update(more)
    return parse_config(data)


def _stream(config: Any) -> list[Event]:
    async def main() -> list[Event]:
        async with MoA.from_config(config) as moa:
            return [e async for e in moa.stream(Q, agent_text=True)]

    return asyncio.run(main())


def _slow_proposers(fake: FakeOpenAIServer, **p2: Any) -> None:
    fake.script("p1", Reply(text=P1, chunk_delay=0.05))
    fake.script("p2", Reply(text=P2, chunk_delay=0.05, **p2))


def test_the_aggregator_starts_while_proposers_stream_and_its_steps_join_without_seams(
    fake: FakeOpenAIServer,
) -> None:
    _slow_proposers(fake)
    fake.respond("agg", _writer())
    events = _stream(_config(fake, continuation="continue_final_message"))

    done = events[-1]
    assert isinstance(done, Done)
    assert done.result.output == TARGET  # no word cut, lost or repeated at any boundary
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == TARGET
    steps = fake.requests_for("agg")
    assert len(steps) > 2
    # Every step after the first continues the answer so far, natively, from a word's end.
    for step in steps[1:]:
        assert step.body["continue_final_message"] is True
        assert step.body["add_generation_prompt"] is False
        partial = _partial_answer(step.body)
        assert partial and TARGET.startswith(partial)
        assert TARGET[len(partial)] == " "  # it stops where a word ends
    # Each step sees the proposer text so far: growing prefixes, whole answers at the end.
    seen = [[ref for ref in (P1, P2) if ref[:8] in step.text] for step in steps]
    assert all(seen)
    first = steps[0].text
    assert P1 not in first or P2 not in first  # the first step came before both were done
    assert P1 in steps[-1].text and P2 in steps[-1].text
    # The aggregator began before the proposers had finished: that is the point.
    kinds = [(type(e).__name__, getattr(e, "is_aggregator", None)) for e in events]
    aggregator_start = kinds.index(("AgentStarted", True))
    proposers_done = max(
        i for i, e in enumerate(events) if isinstance(e, AgentFinished) and not e.is_aggregator
    )
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    assert aggregator_start < first_text < proposers_done
    result = done.result
    assert [a.status for a in result.layers[0].agents] == ["ok", "ok"]
    assert result.aggregator.output == TARGET and result.aggregator.attempts == len(steps)
    assert result.aggregator.usage.completion_tokens > 0
    assert result.ttft_s is not None and result.ttft_s < result.layers[0].latency_s


def test_the_fallback_repairs_a_repeated_tail_and_a_missing_space(fake: FakeOpenAIServer) -> None:
    _slow_proposers(fake)
    fake.respond("agg", _writer(repeat_tail=True))
    events = _stream(_config(fake))  # no continuation capability: the fallback prompt
    done = events[-1]
    assert isinstance(done, Done) and done.result.output == TARGET
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == TARGET
    steps = fake.requests_for("agg")
    assert len(steps) > 2
    for step in steps[1:]:
        assert "continue_final_message" not in step.body
        assert step.messages[-1] == {"role": "user", "content": CONTINUE_INSTRUCTION}
        assert step.messages[-2]["role"] == "assistant"


def test_a_proposer_failing_midway_drops_out_of_later_steps_and_the_run_goes_on(
    fake: FakeOpenAIServer,
) -> None:
    _slow_proposers(fake, cut_after_chunks=3)
    fake.respond("agg", _writer())
    events = _stream(_config(fake, continuation="prefill"))
    done = events[-1]
    assert isinstance(done, Done) and done.result.output == TARGET
    p1, p2 = done.result.layers[0].agents
    assert p1.status == "ok" and p2.status == "failed" and p2.output == P2[:24]
    assert P1 in fake.requests_for("agg")[-1].text
    assert P2[:24] not in fake.requests_for("agg")[-1].text
    # prefill: the partial answer is the last message, with no vLLM-only fields.
    later = fake.requests_for("agg")[1]
    assert later.messages[-1]["role"] == "assistant" and "continue_final_message" not in later.body
    texts = "".join(
        e.text for e in events if isinstance(e, AgentTextDelta) and (e.layer, e.index) == (1, 1)
    )
    assert texts == P2[:24]


def test_with_three_layers_only_the_last_streams_into_the_aggregator(
    fake: FakeOpenAIServer,
) -> None:
    fake.respond("agg", _writer())
    events = _stream(_config(fake, continuation="prefill", layers=3))
    done = events[-1]
    assert isinstance(done, Done) and done.result.output == TARGET
    assert [len(layer.agents) for layer in done.result.layers] == [2, 2]
    second = [r for r in fake.requests if r.model != "agg"][2:]
    assert all("p1 answer 0" in r.text and "p2 answer 0" in r.text for r in second)
    assert "p1 answer 1" in fake.requests_for("agg")[-1].text
    started = [e for e in events if isinstance(e, AgentStarted)]
    assert [(e.layer, e.is_aggregator) for e in started][-1] == (3, True)


def test_all_proposers_failing_before_any_text_is_a_layer_failure(
    fake: FakeOpenAIServer,
) -> None:
    from moa import LayerFailed

    fake.script("p1", Reply(status=400))
    fake.script("p2", Reply(status=400))
    with pytest.raises(LayerFailed) as caught:
        _stream(_config(fake))
    assert caught.value.result is not None and not caught.value.result.ok
    assert fake.requests_for("agg") == []


def test_word_gate_and_join_rules() -> None:
    sent: list[str] = []
    gate = WordGate(sent.append)
    for piece in ("The ti", "des ri", "se and fa"):
        gate.feed(piece)
    assert "".join(sent) == "The tides rise and"
    assert gate.commit() == "The tides rise and"  # "fa" is given back to the next step
    assert join_continuation("the tides rise and", "tides rise and fall") == " fall"
    assert join_continuation("the tides rise", "and fall") == " and fall"
    assert join_continuation("the tides rise", " and fall") == " and fall"
    assert join_continuation("the tides rise", ", twice a day") == ", twice a day"
    no_spaces = WordGate(sent.append)
    no_spaces.feed("潮汐")
    assert no_spaces.commit() == "潮汐"  # no word boundary at all: kept, or no progress


def test_bad_staircase_settings_are_one_clear_line(fake: FakeOpenAIServer) -> None:
    from moa import ConfigError

    for aggregator, message in (
        ({"mode": "ladder"}, "aggregator.mode: Input should be 'wait' or 'staircase'"),
        ({"mode": "staircase", "step_growth": 0.5}, "aggregator.step_growth: Input should be"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_config(
                {
                    "providers": {"fake": {"base_url": fake.base_url}},
                    "proposers": [{"model": "p1"}],
                    "aggregator": {"model": "agg", **aggregator},
                }
            )
        assert message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="continuation: the embedded model always continues"):
        parse_config(
            {
                "providers": {"local": {"type": "llama-cpp", "continuation": "prefill"}},
                "aggregator": {},
                "layers": 1,
            }
        )


def test_a_hung_proposer_is_not_waited_for_and_is_cut_once_the_others_are_done(
    fake: FakeOpenAIServer,
) -> None:
    # p1 and p2 write for 3 s; the cut-off stops the wait for first text at 1.3 s; p3 starts
    # writing at 1.85 s, before the others are done; the hung one never does.
    fake.script("p1", Reply(text=P1, chunk_delay=0.3))
    fake.script("p2", Reply(text=P2, chunk_delay=0.3))
    fake.script("p3", Reply(latency=1.8, text="A late but healthy start.", chunk_delay=0.05))
    fake.script("hung", Reply(hang=60))
    fake.respond("agg", _writer(delay=0.15))
    config = _config(
        fake,
        continuation="prefill",
        proposers=[{"model": m} for m in ("p1", "p2", "p3", "hung")],
    )
    events = _stream(config)
    done = events[-1]
    assert isinstance(done, Done) and done.result.output == TARGET
    p1, p2, p3, hung = done.result.layers[0].agents
    assert (p1.status, p2.status, p3.status) == ("ok", "ok", "ok")  # a slow start is not cut
    assert hung.status == "cancelled" and "straggler" in (hung.error or "")
    # The aggregator started without waiting for the silent ones.
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    p3_text = next(
        i for i, e in enumerate(events) if isinstance(e, AgentTextDelta) and e.index == 2
    )
    assert first_text < p3_text
    assert "A late but healthy start." in fake.requests_for("agg")[-1].text
