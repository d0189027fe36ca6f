"""A proposer layer's agent calls in flight: one task per agent, and each call's result as it
ends, announced with AgentFinished. The engine waits on them (with deadline and straggler
cut-off), the staircase streams them into the aggregator; both stop them here."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

from moa import tracing
from moa.config import Agent, Layer
from moa.results import AgentFinished, AgentResult, AgentStarted, Event, LayerResult

__all__ = ["LayerCalls", "stop"]

#: Starts agent `index`'s call: the coroutine its task runs.
StartCall = Callable[[int, Agent], Coroutine[Any, Any, AgentResult]]


class LayerCalls:
    def __init__(
        self, number: int, layer: Layer, emit: Callable[[Event], None], start: StartCall
    ) -> None:
        self.number = number
        self.layer = layer
        self.emit = emit
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.deadline = None if layer.timeout is None else self.started + layer.timeout
        self.results: dict[int, AgentResult] = {}
        self.tasks: dict[int, asyncio.Task[AgentResult]] = {}
        for index, agent in enumerate(layer.agents):
            emit(AgentStarted(number, index, agent.provider, agent.model))
            self.tasks[index] = asyncio.create_task(start(index, agent))

    def pending(self) -> list[int]:
        """The calls whose result is not recorded yet."""
        return [i for i in self.tasks if i not in self.results]

    def running(self) -> list[int]:
        return [i for i, task in self.tasks.items() if not task.done()]

    def past_deadline(self) -> bool:
        return self.deadline is not None and self.loop.time() >= self.deadline

    @property
    def at_deadline(self) -> str:
        """Why a call cut at the layer's deadline was cancelled."""
        return f"cancelled at the layer deadline ({self.layer.timeout:g} s)"

    def settle(self) -> list[int]:
        """Record (and announce) the calls that have ended; returns their indices. A call that
        raised (BudgetExceeded) raises here and ends the run."""
        # A cancelled task has no outcome to take (.exception() would raise): cancel() records it.
        ended = [
            i for i in self.pending() if self.tasks[i].done() and not self.tasks[i].cancelled()
        ]
        # Every outcome is taken before any is raised: siblings that fail together must not
        # leave an exception never retrieved.
        outcomes = [(i, self.tasks[i].exception()) for i in ended]
        for index, failure in outcomes:
            if failure is not None:
                raise failure
            self.results[index] = self.tasks[index].result()
            self.emit(AgentFinished(self.results[index]))
        return ended

    async def cancel(
        self, indices: Sequence[int], why: str | Callable[[int], str], *, traced: bool = False
    ) -> None:
        """Stop these calls and record each as cancelled, with why (unless it answered
        meanwhile). `traced`: a cut-off, noted as an event on the layer's span."""
        await stop(self.tasks[i] for i in indices)
        for index in indices:
            if index in self.results:  # recorded and announced already
                continue
            task = self.tasks[index]
            if not task.cancelled() and task.exception() is None:
                self.results[index] = task.result()
            else:
                reason = why if isinstance(why, str) else why(index)
                if traced:
                    tracing.add_event(
                        "moa.agent.cut_off", **{"moa.agent.index": index}, reason=reason
                    )
                agent = self.layer.agents[index]
                self.results[index] = AgentResult(
                    layer=self.number,
                    index=index,
                    provider=agent.provider,
                    model=agent.model,
                    status="cancelled",
                    error=reason,
                    latency_s=self.loop.time() - self.started,
                )
            self.emit(AgentFinished(self.results[index]))

    def result(self) -> LayerResult:
        ordered = tuple(self.results[i] for i in range(len(self.tasks)))
        return LayerResult(ordered, self.loop.time() - self.started)


async def stop(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel these tasks and wait until each has ended."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
