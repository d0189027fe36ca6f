"""Staircase streaming (after arXiv 2510.05059): the aggregator writes while proposers stream.

    proposers   ──chunk──chunk──chunk──chunk──chunk──── done
                      │        │           │             │
    aggregator        step 1 ─ step 2 ──── step 3 ────── last step ──► answer

The last proposer layer streams; the aggregator starts as soon as every proposer still running
has sent its first text, and writes the answer in steps of a growing token limit
(`StepSchedule`). Each step is shown all the proposer text received so far, as references, and
continues the answer so far (moa.continuation: natively where the backend can, else with the
fallback prompt). A step that ends inside a word gives that word back to the next step, so no
word is cut or repeated at a boundary. Once every proposer is done, the last step writes the
rest; an aggregator that finishes before then ends the run, and the proposers still writing
are cancelled.

Earlier proposer layers run as usual (with the straggler cut-off); only the last one streams
into the aggregator. In this mode the proposer layer's `min_ok` only asks that some proposer
text exists when the aggregator starts: the answer is already going out when more arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from moa.budget import RunBudget
from moa.config import Agent, Layer, ProviderConfig
from moa.continuation import Continuation, WordGate, join_continuation
from moa.errors import AggregatorFailed, LayerFailed, RunError
from moa.layer_calls import LayerCalls
from moa.providers.base import ChatMessage, estimate_text_tokens
from moa.results import (
    AgentFinished,
    AgentResult,
    AgentStarted,
    AgentTextDelta,
    Event,
    LayerResult,
    TextDelta,
    Usage,
)

if TYPE_CHECKING:
    from moa.engine import MoA

__all__ = ["continuation_for", "run_staircase"]


def continuation_for(config: ProviderConfig | None) -> Continuation:
    """How a provider's model can continue a partial answer (README: "Staircase streaming")."""
    return "native" if config is not None and config.continues_natively() else "fallback"


class _Proposers(LayerCalls):
    """The streaming proposer layer: besides its calls, the text each has sent so far."""

    def __init__(
        self,
        number: int,
        layer: Layer,
        emit: Callable[[Event], None],
        agent_text: bool,
        start: Callable[[int, Agent, Callable[[str], None]], Coroutine[Any, Any, AgentResult]],
    ) -> None:
        # All set before super().__init__, which starts the calls (through _start): whatever a
        # call's text callback touches exists before any call does.
        self.texts: list[list[str]] = [[] for _ in layer.agents]
        self.first: dict[int, float] = {}
        self.changed = asyncio.Event()
        self._agent_text = agent_text
        self._uncuttable = layer.uncut
        self._start_streaming = start
        super().__init__(number, layer, emit, self._start)
        for task in self.tasks.values():
            task.add_done_callback(lambda _task: self.changed.set())

    def _start(self, index: int, agent: Agent) -> Coroutine[Any, Any, AgentResult]:
        """Agent `index`'s call, its text collected as it streams."""
        return self._start_streaming(index, agent, self._collect(index))

    def _collect(self, index: int) -> Callable[[str], None]:
        def on_text(text: str) -> None:
            self.first.setdefault(index, self.loop.time())
            self.texts[index].append(text)
            self.changed.set()
            if self._agent_text:
                self.emit(AgentTextDelta(self.number, index, text))

        return on_text

    def references(self) -> list[str]:
        """Every proposer's text so far: whole answers, and the partial text of those still
        writing. A proposer that failed is left out from then on, even if earlier steps saw
        part of its text."""
        texts = []
        for index in range(len(self.tasks)):
            result = self.results.get(index)
            if result is not None:
                if result.ok:
                    texts.append(result.output)
            elif self.texts[index]:
                texts.append("".join(self.texts[index]))
        return texts

    async def first_chunks(self) -> None:
        """Wait until every proposer still running has sent text. With the straggler cut-off
        on, the aggregator stops waiting for slow starters at the cut-off's time, measured on
        first text; they go on, and join the steps once they write (see `cut_silent`)."""
        layer = self.layer
        enough = max(layer.min_ok, (len(self.tasks) + 1) // 2)
        while True:
            self.settle()
            waiting = [i for i in self.running() if i not in self.first]
            if not waiting:
                return
            if self.first and all(i in self._uncuttable for i in waiting):
                # The embedded model: those still waiting for their first token are waiting
                # for the model (a prompt being read, or a full batch), so start with the text
                # there is.
                return
            cut_at = self.deadline
            if layer.cutoff is not None and len(self.first) >= enough:
                median = statistics.median(t - self.started for t in self.first.values())
                straggle = self.started + layer.cutoff.after(median)
                cut_at = straggle if cut_at is None else min(cut_at, straggle)
            if cut_at is not None and self.loop.time() >= cut_at:
                if self.past_deadline():
                    await self.cancel(waiting, self.at_deadline)
                return
            self.changed.clear()
            timeout = None if cut_at is None else cut_at - self.loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout)

    async def cut_silent(self) -> None:
        """With the cut-off on: once every proposer that wrote anything has finished, the ones
        still silent are stragglers (hung, or far behind), and the last step would wait for
        them. Cut them, as a layer cuts its stragglers."""
        if self.layer.cutoff is None or not any(r.ok for r in self.results.values()):
            return
        running = self.running()
        if running and all(i not in self.first and i not in self._uncuttable for i in running):
            why = (
                f"cut off as a straggler: no text after {self.loop.time() - self.started:.1f} s, "
                "when the others had finished (set wait: all to wait for every agent)"
            )
            await self.cancel(running, why)


async def run_staircase(
    moa: MoA,
    conversation: Sequence[ChatMessage],
    references: Sequence[str],
    budget: RunBudget,
    emit: Callable[[Event], None],
    agent_text: bool,
    started: float,
    layers: list[LayerResult],
) -> None:
    """The last proposer layer and the aggregator, as a staircase. Emits everything down to
    Done, or raises a RunError whose `.result` holds what was done."""
    pipeline = moa.pipeline
    assert pipeline.staircase is not None and pipeline.layers
    number = len(pipeline.layers)
    aggregator = pipeline.aggregator
    how = continuation_for(moa.provider_configs.get(aggregator.provider))

    def start(
        index: int, agent: Agent, on_text: Callable[[str], None]
    ) -> Coroutine[Any, Any, AgentResult]:
        call = moa._call(agent, conversation, references, number, index)
        return moa._call_agent(call, budget, on_text)

    proposers = _Proposers(number, pipeline.layers[-1], emit, agent_text, start)
    ttft: float | None = None
    steps: list[AgentResult] = []
    answer = ""

    def out(text: str) -> None:
        nonlocal ttft
        if ttft is None:
            ttft = time.monotonic() - started
        if agent_text:
            emit(AgentTextDelta(number + 1, 0, text))
        emit(TextDelta(text))

    def finish(status: str, error: str | None = None) -> AgentResult:
        return AgentResult(
            layer=number + 1,
            index=0,
            provider=aggregator.provider,
            model=aggregator.model,
            status=status,  # type: ignore[arg-type]
            output=answer,
            error=error,
            latency_s=time.monotonic() - aggregator_started,
            usage=sum((s.usage for s in steps), Usage()),
            attempts=sum(s.attempts for s in steps),
            references_trimmed=any(s.references_trimmed for s in steps),
        )

    aggregator_started = time.monotonic()
    try:
        try:
            await proposers.first_chunks()
            if not proposers.references():
                await proposers.cancel(proposers.running(), "no proposer text to aggregate")
                raise LayerFailed(number, proposers.layer.min_ok, proposers.result().agents)
            emit(
                AgentStarted(
                    number + 1, 0, aggregator.provider, aggregator.model, is_aggregator=True
                )
            )
            aggregator_started = time.monotonic()
            sizes = pipeline.staircase.sizes()
            produced = 0
            while True:
                proposers.settle()
                await proposers.cut_silent()
                if proposers.past_deadline():
                    await proposers.cancel(proposers.running(), proposers.at_deadline)
                last = not proposers.running()
                left = aggregator.max_tokens - produced
                size = left if last else min(next(sizes), left)
                writer = dataclasses.replace(aggregator, max_tokens=size)
                call = dataclasses.replace(
                    moa._call(writer, conversation, proposers.references(), number + 1, 0),
                    prefix=answer if steps else None,
                    continuation=how,
                )
                live = how == "native" or not steps
                gate = WordGate(out, live=live)
                outcome = await moa._call_agent(call, budget, gate.feed if live else None)
                steps.append(outcome)
                produced += outcome.usage.completion_tokens or estimate_text_tokens(outcome.output)
                if outcome.status == "failed":
                    answer += gate.flush() if live else ""
                    raise AggregatorFailed([finish("failed", outcome.error)])
                if not live:
                    gate.feed(join_continuation(answer, outcome.output))
                done = (
                    last or outcome.status in ("ok", "empty") or produced >= aggregator.max_tokens
                )
                if done:
                    answer += gate.flush()
                    status = "truncated" if outcome.status == "truncated" else "ok"
                    break
                answer += gate.commit()
            if not answer.strip():
                raise AggregatorFailed([finish("empty", "empty answer")])
            await proposers.cancel(proposers.running(), "cancelled: the answer was complete")
            proposers.settle()
        finally:
            await proposers.cancel(proposers.pending(), "cancelled: the run ended")
    except RunError as error:
        if isinstance(error, LayerFailed):
            error.result = moa._partial(layers, started, error)
        else:
            attempts = error.results if isinstance(error, AggregatorFailed) else ()
            error.result = moa._partial(
                [*layers, proposers.result()], started, error, attempts, ttft
            )
        raise
    result = finish(status)
    emit(AgentFinished(result, is_aggregator=True))
    emit(moa._done([*layers, proposers.result()], started, ttft, answer, result, (result,)))
