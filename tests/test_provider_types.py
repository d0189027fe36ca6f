"""Provider types: a new backend is one module and one registration, and configs name it at once.

The toy type below is such a module: a config class with its own key, an in-process provider
that answers from its prompt, and `register_provider_type`. Everything else (validation, the
factory's limits and cache, MoA) comes from the core.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Literal

import pytest

from moa import MoA
from moa.config import ProviderConfig, parse_config
from moa.env import Environment
from moa.errors import ConfigError
from moa.providers import register_provider_type, registry
from moa.providers.base import ChatRequest, Completion, ProviderBase, StreamChunk
from moa.providers.cache import CachedProvider, CallCache
from moa.providers.limits import RateLimitedProvider
from moa.results import Usage

# --- the toy type: what a new provider module holds -------------------------------------------


class EchoConfig(ProviderConfig):
    type: Literal["echo"] = "echo"
    prefix: str = "echo"


class EchoProvider(ProviderBase):
    """Answers '<prefix> <model>: <last message>' without any I/O, and records each request."""

    def __init__(self, name: str, prefix: str) -> None:
        self.name = name
        self.prefix = prefix
        self.requests: list[ChatRequest] = []
        self.closed = False

    async def complete(self, request: ChatRequest) -> Completion:
        self.requests.append(request)
        text = f"{self.prefix} {request.model}: {request.messages[-1]['content']}"
        return Completion(text=text, finish_reason="stop", usage=Usage(3, 4))

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamChunk, None]:
        completion = await self.complete(request)
        yield StreamChunk(text=completion.text)
        yield StreamChunk(finish_reason="stop", usage=completion.usage)

    async def aclose(self) -> None:
        self.closed = True


def build_echo(name: str, config: EchoConfig, env: Environment) -> EchoProvider:
    return EchoProvider(name, config.prefix)


# --- tests -----------------------------------------------------------------------------------


@pytest.fixture
def echo(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EchoProvider]]:
    """The echo type registered for one test (the registry is restored after it); yields the
    providers built, in order."""
    monkeypatch.setattr(registry, "_TYPES", dict(registry._TYPES))
    built: list[EchoProvider] = []

    def build(name: str, config: EchoConfig, env: Environment) -> EchoProvider:
        built.append(build_echo(name, config, env))
        return built[-1]

    register_provider_type(EchoConfig, build)
    yield built


CONFIG = {
    "providers": {"toy": {"type": "echo", "prefix": "hi", "rpm": 600}},
    "proposers": [{"model": "a"}, {"model": "b"}],
    "aggregator": {"model": "agg", "temperature": 0.3},
}


def test_a_registered_type_runs_a_moa_through_config_with_limits_and_cache(
    echo: list[EchoProvider], tmp_path: Path
) -> None:
    config = parse_config(CONFIG)
    assert isinstance(config.providers["toy"], EchoConfig)

    async def run_once() -> str:
        with CallCache(tmp_path / "calls.sqlite3") as cache:
            async with MoA.from_config(config, cache=cache) as moa:
                wrapped = moa.providers["toy"]
                # The factory's wrappers: the cache outside, the config's rpm limit inside.
                assert isinstance(wrapped, CachedProvider)
                limited = wrapped.inner
                assert isinstance(limited, RateLimitedProvider) and limited.inner is echo[-1]
                return (await moa.arun("what is MoA?")).output

    first = asyncio.run(run_once())
    assert first == "hi agg: what is MoA?"
    toy = echo[0]
    assert toy.closed
    assert sorted(r.model for r in toy.requests) == ["a", "agg", "b"]
    assert [r.temperature for r in toy.requests if r.model == "agg"] == [0.3]
    # The rerun is answered from the cache: the new provider is never asked.
    assert asyncio.run(run_once()) == first
    assert echo[1].requests == []


def test_a_pipeline_as_provider_takes_the_request_sampling_settings(
    echo: list[EchoProvider],
) -> None:
    """One override on MoA: the request's temperature and token cap go to the aggregator (the
    agent that writes the answer) whether the pipeline is asked whole or streamed."""

    async def ask(stream: bool) -> list[ChatRequest]:
        async with MoA.from_config(parse_config(CONFIG)) as moa:
            provider = moa.as_provider("jury")
            request = ChatRequest(
                model="ignored",
                messages=[{"role": "user", "content": "grade this"}],
                temperature=0.0,
                max_tokens=77,
            )
            if stream:
                async with contextlib.aclosing(provider.stream(request)) as chunks:
                    text = "".join([chunk.text async for chunk in chunks])
            else:
                text = (await provider.complete(request)).text
            assert text == "hi agg: grade this"
        return echo[-1].requests

    for stream in (False, True):
        requests = {r.model: r for r in asyncio.run(ask(stream))}
        assert (requests["agg"].temperature, requests["agg"].max_tokens) == (0.0, 77)
        assert (requests["a"].temperature, requests["a"].max_tokens) == (0.7, 512)


def test_a_registered_type_checks_its_own_keys(echo: list[EchoProvider]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**CONFIG, "providers": {"toy": {"type": "echo", "prefx": "hi"}}})
    assert str(caught.value).startswith("<config>: providers.toy.prefx: unknown key")
    assert echo == []


def test_an_unknown_type_is_one_line_naming_the_registered_ones(echo: list[EchoProvider]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**CONFIG, "providers": {"toy": {"type": "echos"}}})
    assert str(caught.value) == (
        "<config>: providers.toy.type: Input should be 'openai', 'llama-cpp' or 'echo'"
    )


def test_the_built_in_types_keep_their_one_line_errors() -> None:
    cases = {
        "an OpenAI-compatible provider needs base_url": {"type": "openai"},
        "a llama-cpp provider takes model_path, not base_url or api_key_env": {
            "type": "llama-cpp",
            "base_url": "http://h/v1",
        },
        "providers.x.n_ctx: unknown key": {"base_url": "http://h/v1", "n_ctx": 512},
    }
    for message, provider in cases.items():
        with pytest.raises(ConfigError) as caught:
            parse_config({"providers": {"x": provider}, "aggregator": {"model": "m"}, "layers": 1})
        assert message in str(caught.value) and "\n" not in str(caught.value)
