"""The call cache: real HTTP to the fake server behind a real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from moa import MoA
from moa.config import ConfigFile
from moa.env import Environment
from moa.providers.base import ChatRequest, Completion, StreamChunk
from moa.providers.cache import (
    CachedProvider,
    CallCache,
    cache_key,
    default_cache_path,
)
from moa.providers.openai_compat import OpenAICompatibleProvider
from moa.results import Usage
from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import ConfigMaker, agents


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[CallCache]:
    with CallCache(tmp_path / "calls.sqlite3") as opened:
        yield opened


def _request(text: str = "hello", **settings: object) -> ChatRequest:
    return ChatRequest(
        model="m1",
        messages=[{"role": "user", "content": text}],
        **settings,  # type: ignore[arg-type]
    )


async def _collect(chunks: AsyncIterator[StreamChunk]) -> list[StreamChunk]:
    return [chunk async for chunk in chunks]


# --- keys ---------------------------------------------------------------------------------


def test_key_separates_everything_that_decides_an_answer() -> None:
    base = cache_key("http://a/v1", _request(temperature=0.7, max_tokens=10))
    variants = [
        cache_key("http://b/v1", _request(temperature=0.7, max_tokens=10)),
        cache_key("http://a/v1", _request("other", temperature=0.7, max_tokens=10)),
        cache_key("http://a/v1", _request(temperature=0.8, max_tokens=10)),
        cache_key("http://a/v1", _request(temperature=0.7, max_tokens=11)),
        cache_key("http://a/v1", _request(temperature=0.7, max_tokens=10, top_p=0.9)),
        cache_key("http://a/v1", _request(temperature=0.7, max_tokens=10, seed=1)),
        cache_key("http://a/v1", _request(temperature=0.7, max_tokens=10, sample_index=1)),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_key_ignores_what_does_not_change_the_answer() -> None:
    one = cache_key("http://a/v1", _request(temperature=1, timeout=5))
    other = cache_key("http://a/v1", _request(temperature=1.0, timeout=60))
    assert one == other


def test_default_path_honours_xdg_cache_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = Environment({"XDG_CACHE_HOME": str(tmp_path)})
    assert default_cache_path(env) == tmp_path / "moa" / "calls.sqlite3"
    # A relative value is ignored (the XDG spec says so): the per-user default, as if unset.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    relative = Environment({"XDG_CACHE_HOME": "relative/dir"})
    assert default_cache_path(relative) == tmp_path / "home" / ".cache" / "moa" / "calls.sqlite3"


# --- the provider -------------------------------------------------------------------------


def _upstream(fake: FakeOpenAIServer) -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider("fake", base_url=fake.base_url)


def test_a_repeated_call_is_answered_from_the_cache(
    fake: FakeOpenAIServer, cache: CallCache
) -> None:
    async def go() -> None:
        upstream = _upstream(fake)
        try:
            provider = CachedProvider(upstream, cache, base_url=fake.base_url)
            first = await provider.complete(_request())
            second = await provider.complete(_request())
            assert len(fake.requests) == 1
            assert second == first
            assert second.usage is not None and second.usage.total_tokens > 0
            await provider.complete(_request(sample_index=1))  # another Self-MoA sample: its own
            assert len(fake.requests) == 2
        finally:
            await upstream.aclose()

    asyncio.run(go())


def test_a_cached_stream_replays_the_text_and_ends_with_finish_reason(
    fake: FakeOpenAIServer, cache: CallCache
) -> None:
    async def go() -> None:
        upstream = _upstream(fake)
        try:
            fake.script("m1", Reply(text="a long streamed answer, in pieces"))
            provider = CachedProvider(upstream, cache, base_url=fake.base_url)
            live = await _collect(provider.stream(_request()))
            replayed = await _collect(provider.stream(_request()))
            assert len(fake.requests) == 1
            assert "".join(c.text for c in replayed) == "".join(c.text for c in live)
            assert "".join(c.text for c in live) == "a long streamed answer, in pieces"
            assert replayed[-1].finish_reason == "stop"
            # complete() and stream() share entries: one answer per key
            assert (await provider.complete(_request())).text == "a long streamed answer, in pieces"
            assert len(fake.requests) == 1
        finally:
            await upstream.aclose()

    asyncio.run(go())


def test_errors_and_blank_answers_are_never_cached(
    fake: FakeOpenAIServer, cache: CallCache
) -> None:
    async def go() -> None:
        upstream = _upstream(fake)
        try:
            fake.script("m1", Reply(status=500), Reply(text="   "), Reply(text="fine"))
            provider = CachedProvider(upstream, cache, base_url=fake.base_url)
            with pytest.raises(Exception, match="500"):
                await provider.complete(_request())
            assert (await provider.complete(_request())).text == "   "
            assert (await provider.complete(_request())).text == "fine"
            assert (await provider.complete(_request())).text == "fine"
            assert len(fake.requests) == 3
            fake.script("m1", Reply(text="  "), Reply(text="streamed"))
            blank = await _collect(provider.stream(_request("streamed")))
            assert "".join(c.text for c in blank) == "  "
            again = await _collect(provider.stream(_request("streamed")))
            assert "".join(c.text for c in again) == "streamed"
            assert len(fake.requests) == 5
        finally:
            await upstream.aclose()

    asyncio.run(go())


def test_a_stream_closed_early_is_not_stored(fake: FakeOpenAIServer, cache: CallCache) -> None:
    async def go() -> None:
        upstream = _upstream(fake)
        try:
            fake.script("m1", Reply(text="x" * 200, chunk_delay=0.01))
            provider = CachedProvider(upstream, cache, base_url=fake.base_url)
            async with contextlib.aclosing(provider.stream(_request())) as chunks:
                async for chunk in chunks:
                    if chunk.text:
                        break
            assert cache.get(cache_key(fake.base_url, _request())) is None
        finally:
            await upstream.aclose()

    asyncio.run(go())


def test_a_rerun_of_a_pipeline_makes_no_calls(
    fake: FakeOpenAIServer, make_config: ConfigMaker, tmp_path: Path
) -> None:
    async def go() -> None:
        config = make_config(proposers=agents("p1", "p2", "p3"), aggregator={"model": "agg"})

        async def run_once(config: ConfigFile) -> str:
            with CallCache(tmp_path / "calls.sqlite3") as cache:
                async with MoA.from_config(config, cache=cache) as moa:
                    return (await moa.arun("What is MoA?")).output

        first = await run_once(config)
        assert len(fake.requests) == 4
        fake.reset()
        assert await run_once(config) == first
        assert fake.requests == []

    asyncio.run(go())


# --- corruption and trouble ----------------------------------------------------------------


def _completion() -> Completion:
    return Completion(text="stored", finish_reason="stop", usage=Usage(3, 4))


def test_a_corrupt_file_is_moved_aside_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "calls.sqlite3"
    path.write_bytes(b"this is not a database, just some bytes " * 200)
    with caplog.at_level(logging.WARNING, logger="moa.cache"), CallCache(path) as cache:
        cache.put("k", "m1", _completion())
        assert cache.get("k") == _completion()
    assert "corrupt" in caplog.text
    aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert aside and aside[0].read_bytes().startswith(b"this is not a database")


def test_damage_found_while_running_restarts_the_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "calls.sqlite3"
    with CallCache(path) as cache:
        for n in range(200):  # several pages, so damage past the header is found on read
            cache.put(f"k{n}", "m1", Completion(text="answer " * 50, finish_reason="stop"))
    data = bytearray(path.read_bytes())
    for offset in range(4096, len(data), 97):
        data[offset] = 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="moa.cache"), CallCache(path) as cache:
        for n in range(200):
            cache.get(f"k{n}")  # misses, never an exception
        cache.put("new", "m1", _completion())
        assert cache.get("new") == _completion()
    assert "corrupt" in caplog.text


def test_an_unusable_location_runs_without_a_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING, logger="moa.cache"):
        cache = CallCache(blocker / "calls.sqlite3")
    cache.put("k", "m1", _completion())
    assert cache.get("k") is None
    cache.close()
    assert "cannot be used" in caplog.text


def test_the_cache_is_shared_safely_by_concurrent_calls(
    fake: FakeOpenAIServer, cache: CallCache
) -> None:
    async def go() -> None:
        upstream = _upstream(fake)
        try:
            provider = CachedProvider(upstream, cache, base_url=fake.base_url)
            requests = [_request(f"question {n}") for n in range(30)]
            first = await asyncio.gather(*(provider.complete(r) for r in requests))
            again = await asyncio.gather(*(provider.complete(r) for r in requests))
            assert [c.text for c in again] == [c.text for c in first]
            assert len(fake.requests) == 30
            assert cache.stats.hits == 30 and cache.stats.writes == 30

        finally:
            await upstream.aclose()

    asyncio.run(go())


def test_log_probabilities_are_cached_with_their_answer(
    fake: FakeOpenAIServer, cache: CallCache
) -> None:
    """Asking for log-probabilities does not change the answer, so it shares the key: a stored
    answer without them is fetched again once (and then stored with them), so a confidence run
    never silently loses its scores and reuses what other strategies generated."""

    async def go() -> None:
        upstream = _upstream(fake)
        try:
            fake.respond("m1", lambda body, n: Reply(text="Paris", logprob=-0.5))
            provider = CachedProvider(upstream, cache, base_url=fake.base_url)
            await provider.complete(_request(seed=1))  # stored without log-probabilities
            asking = _request(seed=1, logprobs=True, top_logprobs=2)
            fetched = await provider.complete(asking)
            assert len(fake.requests) == 2 and fetched.logprobs
            replayed = await provider.complete(asking)
            streamed = await _collect(provider.stream(asking))
            assert len(fake.requests) == 2
            assert replayed == fetched
            assert [t for c in streamed if c.logprobs for t in c.logprobs] == list(fetched.logprobs)
            plain = await provider.complete(_request(seed=1))
            assert plain.text == "Paris" and len(fake.requests) == 2
        finally:
            await upstream.aclose()

    asyncio.run(go())
