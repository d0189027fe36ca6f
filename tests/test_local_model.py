"""The real embedded model (SmolLM2-135M via llama.cpp): where behaviour depends on a model."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from moa import AgentResult, MoA, parse_config
from moa.budget import RunBudget
from moa.calls import AgentCall, call_agent
from moa.config import Agent
from moa.providers.base import ChatRequest
from moa.providers.llama_cpp import LlamaCppProvider, default_model_path

pytestmark = pytest.mark.model

SMALL: dict[str, Any] = {
    "providers": {"local": {"type": "llama-cpp", "n_ctx": 1024}},
    "proposers": [{"temperature": 0.7, "seed": 1}, {"temperature": 1.0, "seed": 2}],
    "aggregator": {"temperature": 0.2, "seed": 3},
    "layers": 2,
    "max_tokens": 24,
}


@pytest.fixture(scope="module")
def local_moa() -> Any:
    moa = MoA.from_config(parse_config(SMALL))
    yield moa
    moa.close()


def test_the_model_ships_inside_a_wheel() -> None:
    path = default_model_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_an_offline_moa_run_answers(local_moa: MoA) -> None:
    result = local_moa.run("Name one primary colour.")
    assert result.output.strip()
    assert [len(layer.agents) for layer in result.layers] == [2]
    assert all(agent.ok for agent in result.layers[0].agents)
    assert result.ttft_s is not None and result.ttft_s <= result.latency_s
    # Usage comes from the model's own tokenizer and token stream.
    aggregator = result.aggregator
    assert 0 < aggregator.usage.completion_tokens <= 24
    assert aggregator.usage.prompt_tokens > result.layers[0].agents[0].usage.prompt_tokens


def test_concurrent_calls_on_one_model_decode_together_and_all_finish(local_moa: MoA) -> None:
    provider = local_moa.providers["local"]
    request = ChatRequest(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
    )

    def run(coroutine: Any) -> Any:
        return local_moa._runner.run(coroutine) if local_moa._runner else asyncio.run(coroutine)

    assert isinstance(provider, LlamaCppProvider)

    async def many() -> list[str]:
        results = await asyncio.gather(*(provider.complete(request) for _ in range(4)))
        return [r.text for r in results]

    texts = run(many())
    assert provider.stats.widest_step == 4  # one batch: the four decoded together
    assert len(texts) == 4 and all(texts)  # and every call finished


def test_a_cancelled_generation_frees_the_model() -> None:
    provider = LlamaCppProvider("local", n_ctx=512)
    long = ChatRequest(
        model="smollm2",
        messages=[{"role": "user", "content": "Write a long story."}],
        max_tokens=400,
    )
    short = ChatRequest(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)

    async def cancel_then_ask() -> tuple[str, int]:
        try:
            await provider.complete(short)  # the model is loaded
            chunks = provider.stream(long)
            first = await anext(chunks)  # the story is being written
            await chunks.aclose()  # and its caller leaves, hundreds of tokens before its end
            await provider.complete(short)
            return first.text, provider.stats.widest_step
        finally:
            await provider.aclose()

    story, widest = asyncio.run(cancel_then_ask())
    assert story
    # The abandoned call left the batch before the next one joined: no step ever decoded two
    # sequences. (Counted, not timed: a loaded machine cannot make it pass or fail.)
    assert widest == 1


def test_token_counts_use_the_models_tokenizer() -> None:
    provider = LlamaCppProvider("local", n_ctx=512)

    async def count() -> tuple[int, int]:
        one = await provider.count_tokens("m", [{"role": "user", "content": "hello"}])
        many = await provider.count_tokens("m", [{"role": "user", "content": "hello " * 50}])
        await provider.aclose()
        return one, many

    one, many = asyncio.run(count())
    assert 5 <= one <= 8
    assert 50 <= many - one <= 60


def test_references_are_trimmed_to_the_models_own_context() -> None:
    provider = LlamaCppProvider("local", n_ctx=384)
    long_answers = ["The sky is blue because of Rayleigh scattering. " * 40] * 2  # ~900 tokens
    call = AgentCall(
        agent=Agent(provider="local", model="smollm2", max_tokens=24, seed=1),
        conversation=[{"role": "user", "content": "Why is the sky blue?"}],
        references=long_answers,
        layer=2,
        index=0,
    )

    async def go() -> AgentResult:
        try:
            return await call_agent(provider, call, budget=RunBudget(None))
        finally:
            await provider.aclose()

    result = asyncio.run(go())
    # Without trimming llama.cpp refuses a prompt longer than its context; with it, it answers.
    assert result.ok, result.error
    assert result.references_trimmed
    assert result.usage.prompt_tokens + 24 <= 384


def test_moa_ask_runs_offline_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "local.yaml"
    path.write_text(
        "providers: {local: {type: llama-cpp, n_ctx: 1024}}\n"
        "proposers: [{seed: 1}, {seed: 2}]\naggregator: {seed: 3}\nmax_tokens: 16\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "moa", "ask", "--config", str(path), "Say hello."],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_unseeded_calls_sample_afresh_even_in_a_fresh_process() -> None:
    """Two fresh model instances stand for two server processes: without a seed, the same
    question must not get the same sampled answer (llama-cpp-python alone would repeat it)."""
    request = ChatRequest(
        model="smollm2",
        messages=[{"role": "user", "content": "Invent a name for a cat."}],
        temperature=1.0,
        max_tokens=24,
    )

    async def first_answer() -> str:
        provider = LlamaCppProvider("local", n_ctx=512)
        try:
            return (await provider.complete(request)).text
        finally:
            await provider.aclose()

    answers = {asyncio.run(first_answer()) for _ in range(2)}
    assert len(answers) == 2, answers
