"""Continuous batching on the real embedded model: concurrent calls decode as one batch."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from moa import parse_config
from moa.config import LlamaCppProviderConfig
from moa.errors import ConfigError, ContextLengthExceeded
from moa.providers.base import ChatMessage, ChatRequest, Completion
from moa.providers.llama_cpp import LlamaCppProvider

pytestmark = pytest.mark.model

T = TypeVar("T")


def ask(question: str, **settings: Any) -> ChatRequest:
    settings.setdefault("max_tokens", 12)
    messages: list[ChatMessage] = [{"role": "user", "content": question}]
    return ChatRequest(model="smollm2", messages=messages, **settings)


def on_model(work: Callable[[LlamaCppProvider], Awaitable[T]], **options: Any) -> T:
    """Run `work` against a fresh provider (so its counters start at zero), then close it."""

    async def main() -> T:
        provider = LlamaCppProvider("local", **{"n_ctx": 1024, **options})
        try:
            return await work(provider)
        finally:
            await provider.aclose()

    return asyncio.run(main())


def test_concurrent_sequences_keep_their_own_settings() -> None:
    greedy = ask("Name three colours.", temperature=0.0, max_tokens=4)
    cats = [
        ask("Invent a name for a cat.", temperature=1.0, seed=n, max_tokens=16) for n in (1, 1, 2)
    ]
    scored = ask("What is 2+2?", temperature=0.0, logprobs=True, top_logprobs=2)

    async def work(provider: LlamaCppProvider) -> list[Completion]:
        plain = await provider.complete(ask("What is 2+2?", temperature=0.0, max_tokens=16))
        word = plain.text.split()[1]
        stopped = ask("What is 2+2?", temperature=0.0, max_tokens=16, stop=[" " + word])
        together = await asyncio.gather(
            *(provider.complete(r) for r in (greedy, *cats, scored, stopped))
        )
        assert provider.stats.widest_step == 6  # they did decode together
        return [plain, *together]

    plain, short, cat, same_cat, other_cat, scored_answer, stopped_answer = on_model(work)
    assert short.finish_reason == "length" and short.usage and short.usage.completion_tokens == 4
    # Each sequence draws with its own seed: the same seed, side by side, the same answer.
    assert cat.text == same_cat.text and cat.text != other_cat.text
    assert scored_answer.logprobs is not None and short.logprobs is None
    assert "".join(t.token for t in scored_answer.logprobs) == scored_answer.text
    assert stopped_answer.finish_reason == "stop"
    assert stopped_answer.text.strip() == plain.text.split()[0]


def test_a_greedy_answer_is_the_same_alone_and_inside_a_batch() -> None:
    """Token for token: each sequence attends over its own cache only. (With one cache shared
    by all sequences this answer parted ways after 8 tokens.)"""
    question = ask("Invent a name for a cat.", temperature=0.0, max_tokens=32)
    crowd = [
        ask("Why is the sky blue?", temperature=0.8, max_tokens=24),
        ask("Write a haiku about rain.", temperature=0.0, max_tokens=40),
        ask("Invent a name for a dog.", temperature=1.0, max_tokens=8),
    ]

    async def work(provider: LlamaCppProvider) -> tuple[str, str]:
        alone = await provider.complete(question)
        inside, *_ = await asyncio.gather(*(provider.complete(r) for r in (question, *crowd)))
        assert provider.stats.widest_step == 4
        return alone.text, inside.text

    alone, inside = on_model(work)
    assert len(alone.split()) > 8 and alone == inside


def test_a_shared_prompt_is_evaluated_once() -> None:
    context = "Here is a note about planets. " * 12  # about 80 tokens, shared by all three
    requests = [ask(context + "Name one planet.", temperature=0.9, max_tokens=4) for _ in range(3)]

    async def work(provider: LlamaCppProvider) -> tuple[int, int, int]:
        prompt = len(provider._load_template().tokens(provider._engine().model(), requests[0]))
        await asyncio.gather(*(provider.complete(r) for r in requests))
        return prompt, provider.stats.prompt_tokens_evaluated, provider.stats.prompt_tokens_shared

    prompt, evaluated, shared = on_model(work)
    assert prompt > 80
    # The first sequence evaluates the prompt; the others share all of it but the last token,
    # which each evaluates for its own next-token logits.
    assert evaluated == prompt + 2
    assert shared == 2 * (prompt - 1)


def test_a_cancelled_sequence_stops_while_the_others_finish() -> None:
    async def work(provider: LlamaCppProvider) -> tuple[list[Completion], int]:
        long = provider.stream(ask("Write a long story about a dragon.", max_tokens=300))

        async def first_words() -> str:
            text = ""
            async for chunk in long:
                text += chunk.text
                if len(text.split()) >= 2:
                    break
            await long.aclose()  # cancels the call: it leaves the batch at the next step
            return text

        shorts = [ask(q, temperature=0.0, max_tokens=24) for q in ("Hi!", "What is 2+2?")]
        reading = asyncio.create_task(first_words())
        answers = await asyncio.gather(*(provider.complete(r) for r in shorts))
        assert (await reading).strip()
        return answers, provider.stats.steps

    answers, steps = on_model(work)
    assert all(a.text.strip() and a.finish_reason for a in answers)
    # The long story had 300 tokens to go; the batch ran only as long as the short answers.
    assert steps < 60


def test_a_request_joins_a_batch_that_is_already_running() -> None:
    async def work(provider: LlamaCppProvider) -> tuple[list[str], int]:
        events: list[str] = []
        # Greedy and long, so that it is surely still writing when the short one is done
        # (sampled, a count to twenty sometimes came out as four tokens).
        story = ask("Write a long story about a dragon.", temperature=0.0, max_tokens=64)
        first = provider.stream(story)
        late: asyncio.Task[Completion] | None = None
        async for chunk in first:
            if chunk.text and late is None and len(events) == 3:
                late = asyncio.create_task(provider.complete(ask("Hi!", max_tokens=4)))
                late.add_done_callback(lambda _: events.append("late done"))
            if chunk.text:
                events.append("first text")
        events.append("first done")
        assert late is not None
        await late
        return events, provider.stats.widest_step

    events, widest = on_model(work)
    # The late call started and ended while the first was still generating: it joined the
    # running batch instead of waiting for it to finish.
    assert widest == 2
    assert events.index("late done") < events.index("first done")
    assert events[events.index("late done") + 1 :].count("first text") >= 1


def test_context_overflow_fails_that_call_alone() -> None:
    huge = ask("Repeat this: " + "many words here " * 200)  # about 600 tokens, over 384

    async def work(provider: LlamaCppProvider) -> list[Completion | BaseException]:
        requests = (ask("Hi!", max_tokens=8), huge, ask("What is 2+2?", max_tokens=8))
        return await asyncio.gather(
            *(provider.complete(r) for r in requests), return_exceptions=True
        )

    first, failed, last = on_model(work, n_ctx=384)
    assert isinstance(failed, ContextLengthExceeded), failed
    assert "exceed context window of 384" in str(failed)
    assert isinstance(first, Completion) and first.text
    assert isinstance(last, Completion) and last.text


def test_parallel_is_a_checked_setting() -> None:
    base: dict[str, Any] = {"proposers": [{}], "aggregator": {}}
    config = parse_config({"providers": {"local": {"type": "llama-cpp", "parallel": 4}}, **base})
    assert isinstance(config.providers["local"], LlamaCppProviderConfig)
    assert config.providers["local"].parallel == 4
    with pytest.raises(ConfigError, match="parallel") as caught:
        parse_config({"providers": {"local": {"type": "llama-cpp", "parallel": 0}}, **base})
    assert "\n" not in str(caught.value)


def test_one_call_at_a_time_when_parallel_is_one() -> None:
    async def work(provider: LlamaCppProvider) -> tuple[list[Completion], int]:
        answers = await asyncio.gather(*(provider.complete(ask("Hi!")) for _ in range(3)))
        return answers, provider.stats.widest_step

    answers, widest = on_model(work, parallel=1)
    assert widest == 1 and all(a.text for a in answers)
