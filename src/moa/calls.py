"""One agent call: fit the prompt, then the retry loop with deadlines, ending in an AgentResult.

Every failure an upstream call can have is caught here and becomes a result with status
"failed" and a one-line cause; only `BudgetExceeded` (which must stop the whole run) and
cancellation pass through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from moa import tracing
from moa.budget import CUT_MARKER, RunBudget, fit_references
from moa.config import DEFAULT_HTTP_CONTEXT_WINDOW, Agent
from moa.continuation import Continuation, continue_messages
from moa.errors import (
    ContextLengthExceeded,
    ProviderError,
    ProviderStatusError,
    ProviderTimeout,
    StreamInterrupted,
)
from moa.prompts import build_messages, fence_token
from moa.providers.base import (
    ChatMessage,
    ChatRequest,
    Completion,
    Provider,
    StreamChunk,
    estimate_text_tokens,
)
from moa.providers.collect import StreamCollector
from moa.results import AgentResult, AgentStatus, FailureKind, TokenLogprob, Usage
from moa.retry import decide_retry
from moa.runaway import RUNAWAY_CAUSE, RUNAWAY_FINISH, Runaway

__all__ = ["AgentCall", "call_agent"]

log = logging.getLogger("moa")


@dataclass(frozen=True, slots=True)
class AgentCall:
    """Everything one call needs besides the provider."""

    agent: Agent
    conversation: Sequence[ChatMessage]
    references: Sequence[str]
    layer: int
    index: int
    references_in: Literal["system", "user"] = "system"
    #: Staircase streaming: the answer so far, to be continued (None: a normal call).
    prefix: str | None = None
    continuation: Continuation = "native"
    #: Ask for token log-probabilities (and this many alternatives), for a strategy that scores
    #: answers by them (moa.strategies).
    logprobs: bool = False
    top_logprobs: int | None = None
    #: What the references are introduced with; None: the synthesis instruction.
    instruction: str | None = None


@dataclass(slots=True)
class _Prompt:
    messages: list[ChatMessage]
    tokens: int
    reference_tokens: int
    trimmed: bool


async def _prepare(provider: Provider, call: AgentCall, reference_budget: int | None) -> _Prompt:
    """Build the messages; cut references fairly if prompt + max_tokens would not fit."""
    agent = call.agent

    def build(references: Sequence[str]) -> list[ChatMessage]:
        messages = build_messages(
            call.conversation,
            references,
            system=agent.system,
            references_in=call.references_in,
            token=token,
            **({"instruction": call.instruction} if call.instruction else {}),
        )
        if call.prefix is None:
            return messages
        return continue_messages(messages, call.prefix, call.continuation)

    async def count(messages: Sequence[ChatMessage]) -> int:
        return await provider.count_tokens(agent.model, messages)

    async def count_text(text: str) -> int:
        return await count([{"role": "user", "content": text}]) - await count(
            [{"role": "user", "content": ""}]
        )

    token = fence_token(call.conversation, call.references)
    messages = build(call.references)
    tokens = await count(messages)
    if not call.references:
        return _Prompt(messages, tokens, 0, False)
    window = (
        agent.context_window or provider.context_window(agent.model) or DEFAULT_HTTP_CONTEXT_WINDOW
    )
    skeleton = build([""] * len(call.references))
    overhead = await count(skeleton)
    reference_tokens = tokens - overhead
    budget = window - agent.max_tokens - overhead
    if reference_budget is not None:
        budget = min(budget, reference_budget)
    if reference_tokens <= budget:
        return _Prompt(messages, tokens, reference_tokens, False)

    sizes = [await count_text(text) for text in call.references]
    marker = await count_text(CUT_MARKER)
    limit = window - agent.max_tokens
    for _ in range(4):  # cutting by characters is approximate: check, and tighten if needed
        fitted, trimmed = fit_references(call.references, sizes, budget, marker)
        messages = build(fitted)
        tokens = await count(messages)
        if tokens <= limit and (reference_budget is None or tokens - overhead <= reference_budget):
            break
        budget -= max(tokens - limit, 1) + 8
    return _Prompt(messages, tokens, tokens - overhead, trimmed)


async def _attempt(
    provider: Provider,
    request: ChatRequest,
    agent: Agent,
    on_text: Callable[[str], None] | None,
    collected: StreamCollector,
) -> Completion:
    """One try, bounded by `timeout` (and `first_token_timeout` when streaming). What arrives goes
    into `collected`, which cuts a generation caught in a loop at its first repeat
    (moa.runaway): a streamed one as soon as the loop shows, so it stops, a whole answer once it
    is in (too late to save the tokens, not too late to keep the loop out of the next layer;
    the embedded model stops its own loops early)."""
    where: dict[str, Any] = {"provider": provider.name, "model": agent.model}
    try:
        async with asyncio.timeout(agent.timeout):
            if on_text is None:
                done = await provider.complete(request)
                collected.add(StreamChunk(done.text, done.finish_reason, done.usage, done.logprobs))
            else:
                await _stream(provider, request, agent, on_text, collected)
    except TimeoutError:
        answer = "answer" if on_text is None else "complete answer"
        error: ProviderError = ProviderTimeout(
            f"no {answer} within timeout={agent.timeout:g} s", **where
        )
        if collected.text:
            error = StreamInterrupted(str(error), partial=collected.text, **where)
        raise error from None
    return collected.completion()


async def _stream(
    provider: Provider,
    request: ChatRequest,
    agent: Agent,
    on_text: Callable[[str], None],
    collected: StreamCollector,
) -> None:
    def text(piece: str) -> None:
        first_token.reschedule(None)  # text came: from now on only `timeout` counts
        on_text(piece)

    try:
        async with asyncio.timeout(agent.first_token_timeout) as first_token:
            await collected.read(provider.stream(request), text)
    except TimeoutError:
        raise ProviderTimeout(
            f"no first token within first_token_timeout={agent.first_token_timeout:g} s",
            provider=provider.name,
            model=agent.model,
        ) from None


def _status(completion: Completion) -> AgentStatus:
    if not completion.text.strip():
        return "empty"
    if completion.finish_reason in ("length", RUNAWAY_FINISH):
        return "truncated"
    return "ok"


@dataclass(slots=True)
class _Tries:
    """What one call carries from each attempt to the next."""

    started: float
    want_logprobs: bool
    attempts: int = 0
    usage: Usage = field(default_factory=Usage)
    trimmed: bool = False
    #: Set after a context-length refusal: the references get half the room they had.
    reference_budget: int | None = None


async def call_agent(
    provider: Provider,
    call: AgentCall,
    *,
    budget: RunBudget,
    on_text: Callable[[str], None] | None = None,
    quiet: bool = False,
) -> AgentResult:
    """Run one agent to an AgentResult. With `on_text`, stream and hand over text as it comes.

    `quiet`: `on_text` only listens (the straggler cut-off), nobody is shown the text, so a
    stream that breaks midway is retried like a broken response instead of failing the call."""
    tries = _Tries(started=asyncio.get_running_loop().time(), want_logprobs=call.logprobs)
    while True:
        collected = StreamCollector(stop_runaways=True)
        prompt, outcome = await _try_once(provider, call, tries, budget, on_text, collected)
        if isinstance(outcome, Completion):
            return _answered(call, tries, outcome, collected.runaway)
        log.debug("%s attempt %d failed: %s", call_label(call), tries.attempts, outcome.describe())
        failed = await _after_failure(call, tries, prompt, outcome, quiet)
        if failed is not None:
            return failed


async def _try_once(
    provider: Provider,
    call: AgentCall,
    tries: _Tries,
    budget: RunBudget,
    on_text: Callable[[str], None] | None,
    collected: StreamCollector,
) -> tuple[_Prompt, Completion | ProviderError]:
    """One attempt, its tokens reserved from the run's budget beforehand and settled after,
    whatever happens (cancellation included); only a provider's failure is returned."""
    tries.attempts += 1
    prompt = await _prepare(provider, call, tries.reference_budget)
    tries.trimmed = tries.trimmed or prompt.trimmed
    request = _request(call, prompt.messages, logprobs=tries.want_logprobs)
    worst = prompt.tokens + call.agent.max_tokens
    budget.reserve(worst)
    tracing.note_request(request)
    answered = False
    try:
        completion = await _attempt(provider, request, call.agent, on_text, collected)
        answered = True
        return prompt, completion
    except ProviderError as error:
        return prompt, error
    finally:
        spent = _spent(prompt.tokens, collected, answered)
        tries.usage = tries.usage + spent
        budget.settle(worst, spent.total_tokens)


def _spent(prompt_tokens: int, collected: StreamCollector, answered: bool) -> Usage:
    """What an attempt cost: the provider's count, else an estimate. Text generated before a
    failure was billed too, so it counts; an attempt that produced nothing costs nothing."""
    if collected.usage is not None:
        return collected.usage
    if answered or collected.text:
        return Usage(prompt_tokens, estimate_text_tokens(collected.text))
    return Usage()


def _request(call: AgentCall, messages: list[ChatMessage], *, logprobs: bool) -> ChatRequest:
    agent = call.agent
    return ChatRequest(
        model=agent.model,
        messages=messages,
        temperature=agent.temperature,
        max_tokens=agent.max_tokens,
        top_p=agent.top_p,
        seed=agent.seed,
        timeout=agent.timeout,
        sample_index=call.index,
        continue_final=call.prefix is not None and call.continuation == "native",
        frequency_penalty=agent.frequency_penalty,
        presence_penalty=agent.presence_penalty,
        stop=agent.stop,
        repeat_penalty=agent.repeat_penalty,
        min_p=agent.min_p,
        logprobs=logprobs,
        top_logprobs=call.top_logprobs if logprobs else None,
        user=agent.user,
    )


async def _after_failure(
    call: AgentCall, tries: _Tries, prompt: _Prompt, error: ProviderError, quiet: bool
) -> AgentResult | None:
    """The failed result, or None to try again (after waiting, if the retry policy says so)."""
    if isinstance(error, StreamInterrupted) and not quiet:  # text went out: no silent restart
        return _result(call, tries, "failed", error.partial, error.describe(), failure="transient")
    if tries.want_logprobs and _refused_logprobs(error):
        # Some servers refuse the logprobs fields outright: ask again without them; the
        # strategy that wanted them notices they are missing and says so.
        tries.want_logprobs = False
        return None
    if isinstance(error, ContextLengthExceeded):
        if tries.reference_budget is not None or not call.references:
            cause = (
                f"{error.describe()} (the prompt does not fit even with the references halved: "
                "lower max_tokens or set context_window)"
            )
            return _result(call, tries, "failed", error=cause, failure="context_length")
        tracing.add_event("moa.references_shrunk", attempt=tries.attempts)
        tries.reference_budget = max(prompt.reference_tokens // 2, 1)
        return None
    agent = call.agent
    decision = decide_retry(
        error,
        attempt=tries.attempts,
        max_attempts=agent.max_attempts,
        max_retry_wait=agent.max_retry_wait,
    )
    if not decision.retry:
        cause = error.describe()
        if decision.reason and decision.reason != "not retryable":
            cause = f"{cause} ({decision.reason})"
        kind: FailureKind = "transient" if error.retryable else "rejected"
        return _result(call, tries, "failed", error=cause, failure=kind)
    tracing.add_event(
        "moa.retry",
        attempt=tries.attempts,
        wait_s=decision.wait_s,
        **{"error.type": type(error).__name__},
    )
    await asyncio.sleep(decision.wait_s)
    return None


def _answered(
    call: AgentCall, tries: _Tries, completion: Completion, runaway: Runaway | None
) -> AgentResult:
    tracing.note_response(completion)
    status = _status(completion)
    note = "empty answer" if status == "empty" else None
    if completion.finish_reason == RUNAWAY_FINISH:  # cut by us, or by the provider itself
        note = runaway.describe() if runaway is not None else RUNAWAY_CAUSE
    result = _result(call, tries, status, completion.text, note, logprobs=completion.logprobs)
    log.debug(
        "%s attempt %d: %s in %.2f s", call_label(call), tries.attempts, status, result.latency_s
    )
    return result


def _result(
    call: AgentCall,
    tries: _Tries,
    status: AgentStatus,
    output: str = "",
    error: str | None = None,
    *,
    failure: FailureKind | None = None,
    logprobs: tuple[TokenLogprob, ...] | None = None,
) -> AgentResult:
    return AgentResult(
        layer=call.layer,
        index=call.index,
        provider=call.agent.provider,
        model=call.agent.model,
        status=status,
        output=output,
        error=error,
        latency_s=asyncio.get_running_loop().time() - tries.started,
        usage=tries.usage,
        attempts=tries.attempts,
        references_trimmed=tries.trimmed,
        failure=failure,
        logprobs=logprobs,
    )


def _refused_logprobs(error: ProviderError) -> bool:
    return (
        isinstance(error, ProviderStatusError)
        and not isinstance(error, ContextLengthExceeded)
        and error.status_code in (400, 422)
    )


def call_label(call: AgentCall) -> str:
    return f"layer {call.layer} agent {call.index} ({call.agent.provider}/{call.agent.model})"
