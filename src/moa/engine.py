"""The MoA engine: proposer layers run concurrently, then the aggregator streams the answer.

    conversation ─► layer 1 (agents in parallel) ─► answers ─► layer 2 ─► … ─► aggregator ─► text

Layer 1 sees the conversation; every later call sees the conversation plus the previous
layer's usable answers as fenced references. A layer ends when every agent has settled, when
`min_ok` can no longer be reached, or at its deadline once `min_ok` answers are in.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moa import tracing
from moa._text import describe_unencodable
from moa.budget import RunBudget
from moa.calls import AgentCall, call_agent
from moa.config import Agent, ConfigFile, Layer, Pipeline, ProviderConfig, load_config
from moa.env import Environment
from moa.errors import AggregatorFailed, ConfigError, InvalidRequest, LayerFailed, RunError
from moa.hedge import call_hedged
from moa.layer_calls import LayerCalls, stop
from moa.providers import Limiter, build_providers, local_limits
from moa.providers.base import (
    ChatMessage,
    ChatRequest,
    Completion,
    Provider,
    ProviderBase,
    StreamChunk,
)
from moa.results import (
    AgentFinished,
    AgentResult,
    AgentStarted,
    AgentTextDelta,
    Aggregation,
    Done,
    Event,
    LayerResult,
    RunResult,
    TextDelta,
)
from moa.staircase import run_staircase
from moa.straggler import StragglerWatch
from moa.strategies import SELECT_MAX_TOKENS, Decision, decide

if TYPE_CHECKING:
    from moa.providers.cache import CallCache

__all__ = [
    "AnswerSettings",
    "MoA",
    "PipelineProvider",
    "Prompt",
    "close_providers",
    "normalize_messages",
    "open_pipelines",
]

#: What a run accepts: a question, or an OpenAI-style list of messages.
Prompt = str | Sequence[Mapping[str, Any]]

_ROLES = ("system", "user", "assistant")


def normalize_messages(prompt: Prompt) -> list[ChatMessage]:
    """Check and copy a prompt into plain chat messages; the last must be the user's."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InvalidRequest("the prompt is empty")
        _check_encodable(prompt, "the prompt")
        return [{"role": "user", "content": prompt}]
    messages: list[ChatMessage] = []
    for number, message in enumerate(prompt, start=1):
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"message {number} is not an object with role and content")
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidRequest(
                f"message {number}: role must be one of {', '.join(_ROLES)}, got {role!r}"
            )
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: text ones only
            if not all(isinstance(p, Mapping) and p.get("type", "text") == "text" for p in content):
                raise InvalidRequest(f"message {number}: only text content is supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise InvalidRequest(f"message {number}: content must be a string")
        _check_encodable(content, f"message {number}")
        messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != "user":
        raise InvalidRequest("the last message must be the user's")
    return messages


def _check_encodable(text: str, where: str) -> None:
    problem = describe_unencodable(text)
    if problem is not None:
        raise InvalidRequest(
            f"{where}: the text has {problem}, which cannot be encoded as UTF-8 (a cut emoji "
            "or bytes in another encoding): fix or remove it"
        )


@dataclass(frozen=True, slots=True)
class AnswerSettings:
    """Sampling settings a caller sets on the agents that write its answer; None: as
    configured. The server takes them from a request, a pipeline-as-provider from the
    ChatRequest it is sent (a judge's temperature 0 and token cap), the llm plugin from -o."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    #: The end user: unlike the others it goes to every call of the run, all of which serve them.
    user: str | None = None

    @classmethod
    def of(cls, request: ChatRequest) -> AnswerSettings:
        return cls(**{f.name: getattr(request, f.name) for f in fields(cls)})

    def apply(self, pipeline: Pipeline) -> Pipeline:
        """`pipeline` with these settings on the aggregator and its fallbacks, and the user on
        every agent; the same object when nothing is set."""
        writers = {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}
        if not writers:
            return pipeline
        everyone: dict[str, Any] = {"user": self.user} if self.user is not None else {}
        return replace(
            pipeline,
            layers=tuple(
                replace(layer, agents=tuple(replace(a, **everyone) for a in layer.agents))
                for layer in pipeline.layers
            ),
            aggregator=replace(pipeline.aggregator, **writers),
            fallbacks=tuple(replace(f, **writers) for f in pipeline.fallbacks),
        )


class MoA:
    """A Mixture-of-Agents pipeline, ready to run.

    Build one with `MoA.from_preset("local")`, `MoA.from_file("moa.yaml")` or
    `MoA.from_config(config)`; then `await moa.arun(prompt)`, `moa.run(prompt)` or
    `async for event in moa.stream(prompt)`. Close it (or use `async with` / `with`) to release
    connections and models.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        providers: Mapping[str, Provider],
        *,
        name: str = "moa",
        owns_providers: bool = True,
        provider_configs: Mapping[str, ProviderConfig] | None = None,
    ) -> None:
        """`owns_providers`: closing this MoA closes them (else they are borrowed, and their
        owner closes them). `provider_configs`: what they were built from, for prices and
        traces."""
        missing = sorted(_used_providers(pipeline) - set(providers))
        if missing:
            raise ConfigError(f"no provider instance for: {', '.join(missing)}")
        self.pipeline = pipeline
        self.name = name
        self.providers = dict(providers)
        self.provider_configs = dict(provider_configs or {})
        self._owns_providers = owns_providers
        self._runner: asyncio.Runner | None = None

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: ConfigFile,
        pipeline: str | None = None,
        *,
        env: Environment | None = None,
        name: str | None = None,
        cache: CallCache | None = None,
        limits: Limiter = local_limits,
    ) -> MoA:
        """The pipeline `pipeline` of `config` (or its only one), with providers of its own,
        built by `moa.providers.build_providers` (`cache` and `limits` go to it). Named
        `name`, else after the pipeline."""
        chosen = config.pipeline_name(pipeline)  # checked before any provider is opened
        resolved = config.resolve(chosen)
        env = env or Environment(env_file=config.env_file)
        used = _used_providers(resolved)
        providers = build_providers(config.providers, used, env, cache=cache, limits=limits)
        return cls(resolved, providers, name=name or chosen, provider_configs=config.providers)

    @classmethod
    def from_file(cls, path: str | Path, pipeline: str | None = None, **kwargs: Any) -> MoA:
        return cls.from_config(load_config(path), pipeline, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> MoA:
        from moa.presets import preset_config

        return cls.from_config(preset_config(name), **kwargs)

    def with_answer_settings(self, settings: AnswerSettings) -> MoA:
        """This pipeline with `settings` on the agents that write the answer (the aggregator
        and the fallbacks standing in for it) and the end user on every agent. Proposers keep
        their configured sampling: a caller asks about the answer, not the drafts behind it.
        The copy borrows this one's providers."""
        pipeline = settings.apply(self.pipeline)
        if pipeline is self.pipeline:
            return self
        return MoA(
            pipeline,
            self.providers,
            name=self.name,
            owns_providers=False,
            provider_configs=self.provider_configs,
        )

    # --- running --------------------------------------------------------------------------

    async def arun(self, prompt: Prompt) -> RunResult:
        """Run to the end and return the result. Raises RunError if no answer was produced."""
        async with contextlib.aclosing(self.stream(prompt)) as events:
            async for event in events:
                if isinstance(event, Done):
                    return event.result
        raise RunError(
            "the run ended without a result"
        )  # pragma: no cover - stream always ends in Done

    def run(self, prompt: Prompt) -> RunResult:
        """Synchronous `arun`. Keeps one event loop across calls so connections are reused."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("MoA.run() cannot be called from a running event loop: await arun()")
        if self._runner is None:
            self._runner = asyncio.Runner()
        return self._runner.run(self.arun(prompt))

    async def stream(
        self, prompt: Prompt, *, agent_text: bool = False
    ) -> AsyncGenerator[Event, None]:
        """Run, yielding AgentStarted / AgentFinished as agents go, TextDelta as the final answer
        streams, and Done at the end. Stopping the iteration cancels every call in flight.

        With `agent_text`, every agent's call streams and its text comes as AgentTextDelta
        (the aggregator's too, besides TextDelta). Without it proposers are not streamed: a
        whole answer in one response is cheaper to receive when nobody watches it arrive.
        """
        messages = normalize_messages(prompt)
        queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        task = asyncio.create_task(
            tracing.traced_run(
                self.name,
                self.pipeline,
                self.provider_configs,
                lambda emit: self._run(messages, emit, agent_text),
                queue.put_nowait,
            )
        )
        task.add_done_callback(
            lambda t: queue.put_nowait(t.exception() or _FINISHED) if not t.cancelled() else None
        )
        try:
            while True:
                item = await queue.get()
                if item is _FINISHED:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(
        self,
        conversation: list[ChatMessage],
        emit: Callable[[Event], None],
        agent_text: bool = False,
    ) -> None:
        started = time.monotonic()
        budget = RunBudget(self.pipeline.max_total_tokens)
        layers: list[LayerResult] = []
        references: list[str] = []
        # Staircase streaming runs the last proposer layer together with the aggregator.
        staircase = self.pipeline.staircase is not None and bool(self.pipeline.layers)
        waited = self.pipeline.layers[:-1] if staircase else self.pipeline.layers
        for number, layer in enumerate(waited, start=1):
            try:
                with tracing.layer_span(number, layer):
                    result = await self._run_layer(
                        number, layer, conversation, references, budget, emit, agent_text
                    )
            except RunError as error:
                error.result = self._partial(layers, started, error)
                raise
            layers.append(result)
            references = result.answers
        if staircase:
            return await run_staircase(
                self, conversation, references, budget, emit, agent_text, started, layers
            )

        ttft: float | None = None
        attempts: list[AgentResult] = []

        number = len(self.pipeline.layers) + 1
        aggregation = Aggregation()
        steps: tuple[AgentResult, ...] = ()
        if layers and self.pipeline.aggregation.chooses_or_windows:
            decision = await self._decide(layers, conversation, budget, emit, agent_text)
            aggregation, steps = decision.aggregation, decision.calls
            if decision.output is not None:  # one candidate's text: the answer, all at once
                ttft = time.monotonic() - started
                emit(TextDelta(decision.output))
                # `aggregator` is the call that chose (select), or a stand-in with attempts=0.
                chooser = (
                    decision.calls[-1]
                    if decision.calls
                    else AgentResult(
                        layer=number,
                        index=0,
                        provider=self.pipeline.aggregator.provider,
                        model=self.pipeline.aggregator.model,
                        status="ok",
                        output=decision.output,
                        attempts=0,
                    )
                )
                emit(
                    self._done(layers, started, ttft, decision.output, chooser, steps, aggregation)
                )
                return
            references = list(decision.references)
        for index, agent in enumerate((self.pipeline.aggregator, *self.pipeline.fallbacks)):

            def on_text(text: str, index: int = index) -> None:
                nonlocal ttft
                if ttft is None:
                    ttft = time.monotonic() - started
                if agent_text:
                    emit(AgentTextDelta(number, index, text))
                emit(TextDelta(text))

            call = self._call(agent, conversation, references, number, index)
            emit(AgentStarted(number, index, agent.provider, agent.model, is_aggregator=True))
            try:
                outcome = await self._call_agent(call, budget, on_text)
            except RunError as error:
                error.result = self._partial(layers, started, error, attempts)
                raise
            attempts.append(outcome)
            emit(AgentFinished(outcome, is_aggregator=True))
            if outcome.ok:
                tried = (*steps, *attempts)
                emit(self._done(layers, started, ttft, outcome.output, outcome, tried, aggregation))
                return
            if outcome.output:
                break  # the answer died midway: text already went out, so no fallback
        failure = AggregatorFailed(attempts)
        failure.result = self._partial(layers, started, failure, attempts, ttft)
        raise failure

    async def _decide(
        self,
        layers: Sequence[LayerResult],
        conversation: Sequence[ChatMessage],
        budget: RunBudget,
        emit: Callable[[Event], None],
        agent_text: bool,
    ) -> Decision:
        """Run the aggregator's strategy (moa.strategies) over the last layer's answers. Its
        calls (select's, window steps) are not the answer: with `agent_text` their text comes
        as AgentTextDelta only."""
        number = len(layers) + 1
        agent = self.pipeline.aggregator

        async def ask(references: Sequence[str], instruction: str | None, step: int) -> AgentResult:
            caller = agent
            if instruction is not None:  # select wants a number, not an essay
                caller = replace(agent, max_tokens=min(agent.max_tokens, SELECT_MAX_TOKENS))
            call = replace(
                self._call(caller, conversation, references, number, step),
                instruction=instruction,
            )
            emit(AgentStarted(number, step, agent.provider, agent.model, is_aggregator=True))
            on_text = _agent_text(emit, number, step) if agent_text else None
            outcome = await self._call_agent(call, budget, on_text)
            emit(AgentFinished(outcome, is_aggregator=True))
            return outcome

        return await decide(self.pipeline.aggregation, layers[-1], ask)

    def _done(
        self,
        layers: Sequence[LayerResult],
        started: float,
        ttft: float | None,
        output: str,
        aggregator: AgentResult,
        attempts: Sequence[AgentResult],
        aggregation: Aggregation | None = None,
    ) -> Done:
        """The event that ends a run with an answer."""
        return Done(
            RunResult(
                output=output,
                layers=tuple(layers),
                aggregator=aggregator,
                aggregator_attempts=tuple(attempts),
                latency_s=time.monotonic() - started,
                ttft_s=ttft,
                aggregation=aggregation or Aggregation(),
            )
        )

    def _partial(
        self,
        layers: list[LayerResult],
        started: float,
        error: RunError,
        attempts: Sequence[AgentResult] = (),
        ttft: float | None = None,
    ) -> RunResult:
        """What a failed run got done, for --json and saved results (ok=False)."""
        last = (
            attempts[-1]
            if attempts
            else AgentResult(
                layer=len(self.pipeline.layers) + 1,
                index=0,
                provider=self.pipeline.aggregator.provider,
                model=self.pipeline.aggregator.model,
                status="cancelled",
                error="not called",
            )
        )
        if isinstance(error, LayerFailed):
            layers = [*layers, LayerResult(tuple(error.results), 0.0)]
        return RunResult(
            output=getattr(error, "partial", "") or "",
            layers=tuple(layers),
            aggregator=last,
            aggregator_attempts=tuple(attempts),
            latency_s=time.monotonic() - started,
            ttft_s=ttft,
            ok=False,
            error=str(error),
        )

    def _call(
        self,
        agent: Agent,
        conversation: Sequence[ChatMessage],
        references: Sequence[str],
        layer: int,
        index: int,
    ) -> AgentCall:
        return AgentCall(
            agent=agent,
            conversation=conversation,
            references=references,
            layer=layer,
            index=index,
            references_in=self.pipeline.references_in,
            # Scoring strategies read the last proposer layer's log-probabilities.
            logprobs=layer == len(self.pipeline.layers)
            and self.pipeline.aggregation.needs_logprobs,
            top_logprobs=self.pipeline.aggregation.top_logprobs,
        )

    async def _run_layer(
        self,
        number: int,
        layer: Layer,
        conversation: Sequence[ChatMessage],
        references: Sequence[str],
        budget: RunBudget,
        emit: Callable[[Event], None],
        agent_text: bool = False,
    ) -> LayerResult:
        loop = asyncio.get_running_loop()
        watch = StragglerWatch(
            layer.cutoff,
            len(layer.agents),
            layer.min_ok,
            loop.time(),
            layer.uncut,
            clock=loop.time,
        )

        def start(index: int, agent: Agent) -> Coroutine[Any, Any, AgentResult]:
            on_text = _agent_text(emit, number, index) if agent_text else None
            if watch.watches(index):  # it streams, so that silence tells hung from slow
                on_text = watch.listen(index, on_text)
            call = self._call(agent, conversation, references, number, index)
            return self._call_agent(call, budget, on_text, quiet=not agent_text)

        calls = LayerCalls(number, layer, emit, start)
        try:
            while pending := calls.pending():
                cut_at = watch.deadline(pending)
                wake = min((t for t in (calls.deadline, cut_at) if t is not None), default=None)
                timeout = None if wake is None else max(0.0, wake - loop.time())
                await asyncio.wait(
                    [calls.tasks[i] for i in pending],
                    timeout=timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for index in calls.settle():
                    if calls.results[index].ok:
                        watch.answered(index, loop.time())
                if calls.past_deadline():
                    break
                now = loop.time()
                if due := watch.due(calls.pending(), now):
                    await calls.cancel(due, partial(watch.reason, now=now), traced=True)
                ok = sum(r.ok for r in calls.results.values())
                if ok + len(calls.pending()) < layer.min_ok:
                    break  # min_ok is out of reach
        except BaseException:
            await stop(calls.tasks.values())
            raise
        why = "cancelled: the layer could no longer reach min_ok"
        if calls.past_deadline():
            why = calls.at_deadline
        await calls.cancel(calls.pending(), why, traced=True)
        result = calls.result()
        tracing.layer_done(result.agents)
        if sum(r.ok for r in result.agents) < layer.min_ok:
            raise LayerFailed(number, layer.min_ok, result.agents)
        return result

    async def _call_agent(
        self,
        call: AgentCall,
        budget: RunBudget,
        on_text: Callable[[str], None] | None,
        quiet: bool = False,
    ) -> AgentResult:
        agent = call.agent
        provider = self.providers[agent.provider]
        if agent.hedge_after is None:
            run = call_agent(provider, call, budget=budget, on_text=on_text, quiet=quiet)
        else:
            backup = self.providers[agent.hedge_provider or agent.provider]
            run = call_hedged(provider, backup, call, budget=budget, on_text=on_text, quiet=quiet)
        return await tracing.traced_call(call, self.provider_configs, run)

    def as_provider(self, name: str | None = None) -> Provider:
        """This pipeline behind the provider protocol: serve it, nest it, or judge with it."""
        return PipelineProvider(self, name or self.name)

    # --- lifecycle ------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._owns_providers:
            await asyncio.gather(*(p.aclose() for p in self.providers.values()))

    def close(self) -> None:
        """Synchronous `aclose`, for users of `run()`."""
        runner = self._runner or asyncio.Runner()
        try:
            runner.run(self.aclose())
        finally:
            runner.close()
            self._runner = None

    async def __aenter__(self) -> MoA:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> MoA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        layers, calls = self.pipeline.total_layers, self.pipeline.call_count
        return f"MoA(name={self.name!r}, layers={layers}, calls={calls})"


_FINISHED: Any = object()


def _agent_text(emit: Callable[[Event], None], layer: int, index: int) -> Callable[[str], None]:
    return lambda text: emit(AgentTextDelta(layer, index, text))


class PipelineProvider(ProviderBase):
    """A MoA pipeline that looks like any other provider. The request's model is ignored; its
    sampling settings go to the agents that write the answer (MoA.with_answer_settings), so a
    pipeline judge at temperature 0 with a token cap answers like a single-model one."""

    def __init__(self, moa: MoA, name: str) -> None:
        self.name = name
        self.moa = moa

    def _for(self, request: ChatRequest) -> MoA:
        return self.moa.with_answer_settings(AnswerSettings.of(request))

    async def complete(self, request: ChatRequest) -> Completion:
        result = await self._for(request).arun(list(request.messages))
        return Completion(text=result.output, finish_reason="stop", usage=result.usage)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamChunk, None]:
        events = self._for(request).stream(list(request.messages))
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, TextDelta):
                    yield StreamChunk(text=event.text)
                elif isinstance(event, Done):
                    yield StreamChunk(finish_reason="stop", usage=event.result.usage)

    async def aclose(self) -> None:
        await self.moa.aclose()


def _used_providers(pipeline: Pipeline) -> set[str]:
    """Every provider a pipeline calls: agents' own and their hedges'."""
    return {p for a in _agents(pipeline) for p in (a.provider, a.hedge_provider) if p}


def _agents(pipeline: Pipeline) -> Iterable[Agent]:
    for layer in pipeline.layers:
        yield from layer.agents
    yield pipeline.aggregator
    yield from pipeline.fallbacks


def open_pipelines(config: ConfigFile, *, env: Environment | None = None) -> dict[str, MoA]:
    """Every pipeline of a config, sharing one set of providers (keys are checked for all of
    them before anything connects). The MoA objects borrow the providers: close them with
    `close_providers`."""
    pipelines = {name: config.resolve(name) for name in config.pipelines}
    env = env or Environment(env_file=config.env_file)
    used = {name for p in pipelines.values() for name in _used_providers(p)}
    providers = build_providers(config.providers, used, env)
    return {
        name: MoA(
            pipeline,
            providers,
            name=name,
            owns_providers=False,
            provider_configs=config.providers,
        )
        for name, pipeline in pipelines.items()
    }


async def close_providers(pipelines: Mapping[str, MoA]) -> None:
    shared = {id(p): p for moa in pipelines.values() for p in moa.providers.values()}
    await asyncio.gather(*(p.aclose() for p in shared.values()))
