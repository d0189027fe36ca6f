"""One agent call: fit the prompt, then the retry loop with deadlines, ending in an AgentResult.

Every failure an upstream call can have is caught here and becomes a result with status
"failed" and a one-line cause; only `BudgetExceeded` (which must stop the whole run) and
cancellation pass through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
)
from moa.results import AgentResult, AgentStatus, FailureKind, TokenLogprob, Usage
from moa.retry import decide_retry
from moa.runaway import RUNAWAY_CAUSE, RUNAWAY_FINISH, Runaway, RunawayGuard, find_runaway

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
    received: list[str],
    runaways: list[Runaway],
) -> Completion:
    """One try, bounded by `timeout` (and `first_token_timeout` when streaming). A generation
    caught in a loop is cut at its first repeat (moa.runaway), noted in `runaways`."""
    where: dict[str, Any] = {"provider": provider.name, "model": agent.model}
    if on_text is None:
        try:
            async with asyncio.timeout(agent.timeout):
                completion = await provider.complete(request)
        except TimeoutError:
            raise ProviderTimeout(
                f"no answer within timeout={agent.timeout:g} s", **where
            ) from None
        # A whole answer: too late to save the tokens, not too late to keep the loop out of the
        # next layer. (The embedded model stops its own loops early: see LlamaCppProvider.)
        runaway = find_runaway(completion.text)
        if runaway is None:
            return completion
        runaways.append(runaway)
        return replace(
            completion, text=completion.text[: runaway.keep], finish_reason=RUNAWAY_FINISH
        )

    finish: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None
    guard = RunawayGuard()
    try:
        async with asyncio.timeout(agent.timeout):
            try:
                async with (
                    asyncio.timeout(agent.first_token_timeout) as first_token,
                    contextlib.aclosing(provider.stream(request)) as chunks,
                ):
                    async for chunk in chunks:
                        if chunk.text:
                            if not received:
                                first_token.reschedule(None)
                            received.append(chunk.text)
                            on_text(chunk.text)
                            runaway = guard.feed(chunk.text)
                            if runaway is not None:  # leaving closes the stream: it stops
                                runaways.append(runaway)
                                break
                        finish = chunk.finish_reason or finish
                        usage = chunk.usage or usage
                        if chunk.logprobs is not None:
                            logprobs = [*(logprobs or ()), *chunk.logprobs]
            except TimeoutError:
                raise ProviderTimeout(
                    f"no first token within first_token_timeout={agent.first_token_timeout:g} s",
                    **where,
                ) from None
    except TimeoutError:
        error: ProviderError = ProviderTimeout(
            f"no complete answer within timeout={agent.timeout:g} s", **where
        )
        if received:
            error = StreamInterrupted(str(error), partial="".join(received), **where)
        raise error from None
    if runaways:
        text = "".join(received)[: runaways[-1].keep]
        return Completion(text=text, finish_reason=RUNAWAY_FINISH, usage=usage)
    return Completion(
        text="".join(received),
        finish_reason=finish,
        usage=usage,
        logprobs=None if logprobs is None else tuple(logprobs),
    )


def _status(completion: Completion) -> AgentStatus:
    if not completion.text.strip():
        return "empty"
    if completion.finish_reason in ("length", RUNAWAY_FINISH):
        return "truncated"
    return "ok"


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
    agent = call.agent
    started = time.monotonic()
    usage = Usage()
    attempts = 0
    reference_budget: int | None = None
    shrunk_for_context = False
    trimmed = False
    want_logprobs = call.logprobs
    logprobs: tuple[TokenLogprob, ...] | None = None

    def result(
        status: AgentStatus,
        output: str = "",
        error: str | None = None,
        failure: FailureKind | None = None,
    ) -> AgentResult:
        return AgentResult(
            layer=call.layer,
            index=call.index,
            provider=agent.provider,
            model=agent.model,
            status=status,
            output=output,
            error=error,
            latency_s=time.monotonic() - started,
            usage=usage,
            attempts=attempts,
            references_trimmed=trimmed,
            failure=failure,
            logprobs=logprobs,
        )

    while True:
        attempts += 1
        prompt = await _prepare(provider, call, reference_budget)
        trimmed = trimmed or prompt.trimmed
        request = ChatRequest(
            model=agent.model,
            messages=prompt.messages,
            temperature=agent.temperature,
            max_tokens=agent.max_tokens,
            top_p=agent.top_p,
            seed=agent.seed,
            timeout=agent.timeout,
            sample=call.index,
            continue_final=call.prefix is not None and call.continuation == "native",
            frequency_penalty=agent.frequency_penalty,
            presence_penalty=agent.presence_penalty,
            stop=agent.stop,
            repeat_penalty=agent.repeat_penalty,
            min_p=agent.min_p,
            logprobs=want_logprobs,
            top_logprobs=call.top_logprobs if want_logprobs else None,
            user=agent.user,
        )
        reserved = budget.reserve(prompt.tokens + agent.max_tokens)
        tracing.note_request(request)
        received: list[str] = []
        runaways: list[Runaway] = []
        spent = Usage()
        try:
            completion = await _attempt(provider, request, agent, on_text, received, runaways)
            spent = completion.usage or Usage(prompt.tokens, max(1, len(completion.text) // 4))
        except ProviderError as error:
            if received:  # tokens were generated, and are billed, even though the call failed
                spent = Usage(prompt.tokens, len(received))
            usage = usage + spent
            budget.settle(reserved, spent.total_tokens)
            log.debug("%s attempt %d failed: %s", call_label(call), attempts, error.describe())
            if isinstance(error, StreamInterrupted) and not quiet:  # a retry would repeat text
                return result(
                    "failed", output=error.partial, error=error.describe(), failure="transient"
                )
                return result("failed", output=error.partial, error=error.describe())
            if want_logprobs and _refused_logprobs(error):
                # Some servers refuse the logprobs fields outright: ask again without them; the
                # strategy that wanted them notices they are missing and says so.
                want_logprobs = False
                continue
            if isinstance(error, ContextLengthExceeded):
                if shrunk_for_context or not call.references:
                    return result(
                        "failed",
                        error=f"{error.describe()} (the prompt does not fit even with the "
                        "references halved: lower max_tokens or set context_window)",
                        failure="context_length",
                    )
                shrunk_for_context = True
                tracing.add_event("moa.references_shrunk", attempt=attempts)
                reference_budget = max(prompt.reference_tokens // 2, 1)
                continue
            decision = decide_retry(
                error,
                attempt=attempts,
                max_attempts=agent.max_attempts,
                max_retry_wait=agent.max_retry_wait,
            )
            if not decision.retry:
                cause = error.describe()
                if decision.reason and decision.reason != "not retryable":
                    cause = f"{cause} ({decision.reason})"
                kind: FailureKind = "transient" if error.retryable else "rejected"
                return result("failed", error=cause, failure=kind)
            tracing.add_event(
                "moa.retry",
                attempt=attempts,
                wait_s=decision.wait_s,
                **{"error.type": type(error).__name__},
            )
            await asyncio.sleep(decision.wait_s)
            continue
        except BaseException:
            budget.settle(reserved, spent.total_tokens)
            raise
        usage = usage + spent
        budget.settle(reserved, spent.total_tokens)
        tracing.note_response(completion)
        status = _status(completion)
        log.debug(
            "%s attempt %d: %s in %.2f s",
            call_label(call),
            attempts,
            status,
            time.monotonic() - started,
        )
        logprobs = completion.logprobs
        note = "empty answer" if status == "empty" else None
        if completion.finish_reason == RUNAWAY_FINISH:
            note = runaways[-1].describe() if runaways else RUNAWAY_CAUSE
        return result(status, output=completion.text, error=note)


def _refused_logprobs(error: ProviderError) -> bool:
    return (
        isinstance(error, ProviderStatusError)
        and not isinstance(error, ContextLengthExceeded)
        and error.status_code in (400, 422)
    )


def call_label(call: AgentCall) -> str:
    return f"layer {call.layer} agent {call.index} ({call.agent.provider}/{call.agent.model})"
