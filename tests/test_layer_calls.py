"""LayerCalls on its own: each call's result recorded and announced exactly once, whether it
ended by itself or was stopped."""

from __future__ import annotations

import asyncio

from moa.config import Agent, Layer
from moa.layer_calls import LayerCalls
from moa.results import AgentFinished, AgentResult, Event


def test_each_call_is_announced_once_and_a_cancelled_one_does_not_break_settle() -> None:
    async def scenario() -> tuple[list[Event], dict[int, str]]:
        layer = Layer(agents=tuple(Agent("fake", f"m{i}") for i in range(3)))
        events: list[Event] = []
        release = asyncio.Event()

        async def start(index: int, agent: Agent) -> AgentResult:
            if index > 0:
                await release.wait()
            return AgentResult(1, index, agent.provider, agent.model, "ok", output="done")

        calls = LayerCalls(1, layer, events.append, start)
        await asyncio.sleep(0)  # call 0 answers; 1 and 2 wait
        assert calls.settle() == [0]
        calls.tasks[2].cancel()  # stopped from outside, never recorded by settle
        await asyncio.sleep(0)
        assert calls.settle() == []
        # Call 0 is recorded already: cancelling it again must not announce it twice.
        await calls.cancel([0, 1, 2], "cut")
        return events, {i: r.status for i, r in calls.results.items()}

    events, statuses = asyncio.run(scenario())
    finished = [e.result.index for e in events if isinstance(e, AgentFinished)]
    assert sorted(finished) == [0, 1, 2]
    assert statuses == {0: "ok", 1: "cancelled", 2: "cancelled"}
