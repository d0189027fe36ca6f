"""Layer wiring, concurrency, multi-turn history and streaming events, over real HTTP."""

from __future__ import annotations

import asyncio
import re

import pytest

from moa import AgentFinished, AgentStarted, Done, MoA, TextDelta
from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import ConfigMaker, MoAMaker, agents

QUESTION = "What is the boiling point of water at sea level?"


def _layer_of(request_text: str) -> set[str]:
    """The fake server's default answers ("<model> answer <n>") that a request was shown."""
    return {line for line in request_text.splitlines() if re.fullmatch(r"\w+ answer \d+", line)}


@pytest.mark.parametrize(("n", "layers"), [(1, 2), (3, 2), (3, 3), (6, 3), (2, 4)])
def test_call_count_is_n_times_layers_minus_one_plus_one(
    fake: FakeOpenAIServer, make_moa: MoAMaker, n: int, layers: int
) -> None:
    moa = make_moa(
        proposers=agents(*(f"p{i}" for i in range(n))), aggregator={"model": "agg"}, layers=layers
    )
    moa.run(QUESTION)
    assert len(fake.requests) == n * (layers - 1) + 1
    assert moa.pipeline.call_count == n * (layers - 1) + 1


def test_each_call_is_shown_exactly_the_previous_layers_answers(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    moa = make_moa(proposers=agents("p1", "p2", "p3"), aggregator={"model": "agg"}, layers=3)
    result = moa.run(QUESTION)

    first = [r for r in fake.requests if not _layer_of(r.text)]
    assert sorted(r.model for r in first) == ["p1", "p2", "p3"]
    # Layer 2: every proposer sees the three layer-1 answers (call #0 of each model).
    layer1_answers = {"p1 answer 0", "p2 answer 0", "p3 answer 0"}
    second = [r for r in fake.requests if r.model != "agg" and _layer_of(r.text)]
    assert len(second) == 3
    for request in second:
        assert _layer_of(request.text) == layer1_answers
    # The aggregator sees only the layer-2 answers.
    (aggregator,) = fake.requests_for("agg")
    assert _layer_of(aggregator.text) == {"p1 answer 1", "p2 answer 1", "p3 answer 1"}
    assert aggregator.stream
    # The question reaches every call, as the user's message.
    for request in fake.requests:
        assert request.messages[-1] == {"role": "user", "content": QUESTION}
    assert [len(layer.agents) for layer in result.layers] == [3, 3]
    assert result.output == "agg answer 0"


def test_references_sit_in_the_system_message_by_default_or_the_user_message(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    make_moa(proposers=agents("p1"), aggregator={"model": "agg"}).run(QUESTION)
    (aggregator,) = fake.requests_for("agg")
    assert aggregator.messages[0]["role"] == "system"
    assert "p1 answer 0" in aggregator.messages[0]["content"]
    fake.reset()
    make_moa(proposers=agents("p1"), aggregator={"model": "agg"}, references_in="user").run(
        QUESTION
    )
    (aggregator,) = fake.requests_for("agg")
    assert [m["role"] for m in aggregator.messages] == ["user"]
    assert "p1 answer 0" in aggregator.messages[0]["content"]
    assert aggregator.messages[0]["content"].endswith(QUESTION)


def test_agents_of_a_layer_run_concurrently(fake: FakeOpenAIServer, make_moa: MoAMaker) -> None:
    fake.respond("*", lambda body, n: Reply(latency=0.3))
    moa = make_moa(proposers=agents("p1", "p2", "p3", "p4"), aggregator={"model": "agg"})
    moa.run(QUESTION)
    layer1 = [r for r in fake.requests if r.model != "agg"]
    # Every proposer call had started before the first one finished: they overlapped.
    assert max(r.started for r in layer1) < min(r.ended or 0 for r in layer1)


def test_per_agent_settings_reach_the_wire(fake: FakeOpenAIServer, make_moa: MoAMaker) -> None:
    moa = make_moa(
        proposers=[
            {"model": "p1", "temperature": 0.1, "seed": 7, "top_p": 0.5},
            {"model": "p1", "temperature": 1.2, "max_tokens": 33, "system": "Be terse."},
        ],
        aggregator={"model": "agg", "max_tokens": 99},
        temperature=0.4,
        max_tokens=64,
    )
    moa.run(QUESTION)
    bodies = sorted((r.body for r in fake.requests_for("p1")), key=lambda b: b["temperature"])
    assert bodies[0]["temperature"] == 0.1 and bodies[0]["seed"] == 7 and bodies[0]["top_p"] == 0.5
    assert bodies[0]["max_tokens"] == 64
    assert bodies[1]["temperature"] == 1.2 and bodies[1]["max_tokens"] == 33
    assert bodies[1]["messages"][0] == {"role": "system", "content": "Be terse."}
    (aggregator,) = fake.requests_for("agg")
    assert aggregator.body["max_tokens"] == 99 and aggregator.body["temperature"] == 0.4


def test_long_form_runs_heterogeneous_layers(fake: FakeOpenAIServer, make_moa: MoAMaker) -> None:
    moa = make_moa(
        layers=[agents("a", "b"), {"agents": agents("c"), "min_ok": 1}],
        aggregator={"model": "agg"},
    )
    result = moa.run(QUESTION)
    assert [r.model for r in fake.requests][-1] == "agg"
    assert sorted(r.model for r in fake.requests) == ["a", "agg", "b", "c"]
    (c,) = fake.requests_for("c")
    assert _layer_of(c.text) == {"a answer 0", "b answer 0"}
    assert result.layers[1].agents[0].model == "c"


def test_a_single_layer_is_the_aggregator_alone(fake: FakeOpenAIServer, make_moa: MoAMaker) -> None:
    result = make_moa(aggregator={"model": "agg"}, layers=1).run(QUESTION)
    assert [r.model for r in fake.requests] == ["agg"]
    assert fake.requests[0].messages == [{"role": "user", "content": QUESTION}]
    assert result.output == "agg answer 0"


def test_multi_turn_history_reaches_every_agent_and_references_only_the_last_turn(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    moa = make_moa(proposers=agents("p1", "p2"), aggregator={"model": "agg"})
    first = moa.run("Name a prime number.")
    history = [
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": first.output},
        {"role": "user", "content": "And the next one?"},
    ]
    fake.reset()
    moa.run(history)
    for request in fake.requests:
        turns = [m for m in request.messages if m["role"] != "system"]
        assert turns == history
    (aggregator,) = fake.requests_for("agg")
    system = aggregator.messages[0]["content"]
    # References are this turn's proposer answers, not the previous turn's.
    assert "p1 answer 0" in system and "p2 answer 0" in system
    assert first.output not in system


def test_stream_yields_agent_events_then_text_then_done(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    moa = make_moa(proposers=agents("p1", "p2"), aggregator={"model": "agg"})
    fake.script("agg", Reply(text="The final answer, streamed in pieces."))

    async def collect() -> list[object]:
        return [event async for event in moa.stream(QUESTION)]

    events = asyncio.run(collect())
    kinds = [type(e).__name__ for e in events]
    assert kinds[:2] == ["AgentStarted", "AgentStarted"]
    assert kinds.count("AgentFinished") == 3
    assert kinds[-1] == "Done"
    started_agg = next(
        i for i, e in enumerate(events) if isinstance(e, AgentStarted) and e.is_aggregator
    )
    first_text = kinds.index("TextDelta")
    assert started_agg < first_text
    assert all(isinstance(e, AgentFinished) for e in events[2:4])
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    done = events[-1]
    assert isinstance(done, Done)
    assert text == done.result.output == "The final answer, streamed in pieces."
    assert kinds.count("TextDelta") > 1
    result = done.result
    assert result.ttft_s is not None and 0 < result.ttft_s <= result.latency_s
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0
    assert result.usage == sum((c.usage for c in result.calls), type(result.usage)())


def test_async_api_and_sync_api_agree(fake: FakeOpenAIServer, make_config: ConfigMaker) -> None:
    config = make_config(proposers=agents("p1"), aggregator={"model": "agg"})

    async def main() -> str:
        async with MoA.from_config(config) as moa:
            return (await moa.arun(QUESTION)).output

    assert asyncio.run(main()) == "agg answer 0"
    with MoA.from_config(config) as moa:
        assert moa.run(QUESTION).output == "agg answer 1"
        assert moa.run(QUESTION).output == "agg answer 2"  # one loop, reused connections


def test_run_inside_an_event_loop_says_to_await_arun(make_moa: MoAMaker) -> None:
    moa = make_moa(proposers=agents("p1"), aggregator={"model": "agg"})

    async def main() -> None:
        with pytest.raises(RuntimeError, match="arun"):
            moa.run(QUESTION)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("   ", "empty"),
        ([], "last message must be the user's"),
        ([{"role": "robot", "content": "hi"}], "role must be one of"),
        ([{"role": "user", "content": 3}], "content must be a string"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
    ],
)
def test_bad_prompts_are_refused_with_a_clear_message(
    make_moa: MoAMaker, prompt: object, message: str
) -> None:
    from moa import InvalidRequest

    moa = make_moa(proposers=agents("p1"), aggregator={"model": "agg"})
    with pytest.raises(InvalidRequest, match=message):
        moa.run(prompt)  # type: ignore[arg-type]


def test_openai_content_parts_are_accepted(fake: FakeOpenAIServer, make_moa: MoAMaker) -> None:
    moa = make_moa(aggregator={"model": "agg"}, layers=1)
    moa.run([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}])
    assert fake.requests[0].messages == [{"role": "user", "content": "Hello"}]
