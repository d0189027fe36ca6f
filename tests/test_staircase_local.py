"""Staircase streaming on the real embedded model: native continuation of a partial answer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from moa import Done, MoA, TextDelta, parse_config
from moa.providers.base import ChatMessage, ChatRequest
from moa.providers.llama_cpp import LlamaCppProvider

pytestmark = pytest.mark.model

MESSAGES: list[ChatMessage] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Why is the sky blue?"},
]


def test_a_continued_answer_joins_the_uninterrupted_one_exactly() -> None:
    async def main() -> tuple[str, str, str]:
        provider = LlamaCppProvider("local", n_ctx=1024)
        try:
            greedy: dict[str, Any] = {"model": "smollm2", "temperature": 0.0, "seed": 1}
            whole = await provider.complete(ChatRequest(messages=MESSAGES, max_tokens=48, **greedy))
            words = whole.text.split(" ")
            prefix = " ".join(words[: len(words) // 2])  # cut where a word ends, as a step is
            rest = await provider.complete(
                ChatRequest(
                    messages=[*MESSAGES, {"role": "assistant", "content": prefix}],
                    max_tokens=16,
                    continue_final=True,
                    **greedy,
                )
            )
            return whole.text, prefix, rest.text
        finally:
            await provider.aclose()

    whole, prefix, rest = asyncio.run(main())
    assert len(prefix.split()) >= 4 and rest.strip()
    # Greedy decoding from the same tokens: the continuation is the answer's own next words,
    # with no word cut, repeated or glued at the seam.
    assert whole.startswith(prefix + rest) or (prefix + rest).startswith(whole)


def test_a_staircase_run_on_the_embedded_model() -> None:
    config = parse_config(
        {
            "providers": {"local": {"type": "llama-cpp", "n_ctx": 1024}},
            "proposers": [{"temperature": 0.7}, {"temperature": 1.0}],
            "aggregator": {"mode": "staircase", "step_tokens": 2, "temperature": 0.2},
            "max_tokens": 16,
        }
    )

    async def main() -> list[object]:
        async with MoA.from_config(config) as moa:
            return [e async for e in moa.stream("Name one primary colour.")]

    events = asyncio.run(main())
    done = events[-1]
    assert isinstance(done, Done)
    result = done.result
    assert result.output.strip()
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == result.output
    assert result.aggregator.attempts >= 2  # written in steps
    # The aggregator decodes in the same batch as the proposers, so it may finish first: a
    # proposer still writing then is cancelled for that reason, never cut as a straggler.
    for agent in result.layers[0].agents:
        assert agent.ok or agent.error == "cancelled: the answer was complete", agent
