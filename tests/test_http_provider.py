"""The OpenAI-compatible provider's own HTTP path, against the fake server on loopback.

The fault suite (test_faults.py) covers retries, statuses, timeouts and cut streams through the
engine; these are the protocol details below it.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from moa.errors import MalformedResponse, ProviderConnectionError, StreamInterrupted
from moa.providers.base import ChatRequest, StreamChunk
from moa.providers.openai_compat import OpenAICompatibleProvider
from moa.testing import FakeOpenAIServer, Reply

ASK = ChatRequest(model="m", messages=[{"role": "user", "content": "Hello?"}], temperature=0.5)


def stream_all(provider: OpenAICompatibleProvider, request: ChatRequest = ASK) -> list[StreamChunk]:
    async def go() -> list[StreamChunk]:
        try:
            return [chunk async for chunk in provider.stream(request)]
        finally:
            await provider.aclose()

    return asyncio.run(go())


def sse(body: str) -> Reply:
    return Reply(body=body, content_type="text/event-stream")


def test_a_stream_with_comments_crlf_and_multiline_data_is_read_whole(
    fake: FakeOpenAIServer,
) -> None:
    chunk = '{"choices": [{"index": 0, "delta": {"content": "%s"}, "finish_reason": %s}]}'
    body = (
        ": keep-alive\r\n\r\n"
        "data: " + chunk % ("Hel", "null") + "\r\n\r\n"
        # One JSON object over two data lines: joined with a newline, still valid JSON.
        'data: {"choices": [{"index": 0,\r\ndata:  "delta": {"content": "lo"}, '
        '"finish_reason": null}]}\r\n\r\n'
        ": another comment\n"
        "data: " + chunk % ("", '"stop"') + "\n\n"
        'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}\n\n'
        "data: [DONE]\n\n"
    )
    fake.script("m", sse(body))
    chunks = stream_all(OpenAICompatibleProvider("fake", base_url=fake.base_url))
    assert "".join(c.text for c in chunks) == "Hello"
    assert chunks[-2].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 5
    (request,) = fake.requests
    assert request.body["stream"] is True and request.body["temperature"] == 0.5
    assert request.body["stream_options"] == {"include_usage": True}


def test_an_error_event_mid_stream_keeps_the_partial_text(fake: FakeOpenAIServer) -> None:
    body = (
        'data: {"choices": [{"index": 0, "delta": {"content": "Partial"}}]}\n\n'
        'data: {"error": {"message": "upstream overloaded"}}\n\n'
    )
    fake.script("m", sse(body))
    with pytest.raises(StreamInterrupted, match="upstream overloaded") as caught:
        stream_all(OpenAICompatibleProvider("fake", base_url=fake.base_url))
    assert caught.value.partial == "Partial"


def test_an_unreadable_event_is_a_malformed_response(fake: FakeOpenAIServer) -> None:
    fake.script("m", sse("data: {not json\n\n"))
    with pytest.raises(MalformedResponse, match="not JSON"):
        stream_all(OpenAICompatibleProvider("fake", base_url=fake.base_url))


def test_no_credentials_or_organisation_headers_leak_from_the_environment(
    fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-meant-for-someone-else")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-elsewhere")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-elsewhere")
    stream_all(OpenAICompatibleProvider("fake", base_url=fake.base_url))
    keyed = OpenAICompatibleProvider("fake", base_url=fake.base_url, api_key="sk-ours-123456")
    stream_all(keyed)
    bare, with_key = fake.requests
    assert not {"authorization", "openai-organization", "openai-project"} & set(bare.headers)
    assert with_key.headers["authorization"] == "Bearer sk-ours-123456"
    assert "openai-organization" not in with_key.headers


def test_a_reader_that_stops_early_ends_the_upstream_request(fake: FakeOpenAIServer) -> None:
    fake.script("m", Reply(text="x" * 200, chunk_delay=0.2))
    provider = OpenAICompatibleProvider("fake", base_url=fake.base_url)

    async def first_piece() -> str:
        chunks = provider.stream(ASK)
        try:
            async for chunk in chunks:
                if chunk.text:
                    return chunk.text
            return ""
        finally:
            await chunks.aclose()
            await provider.aclose()

    assert asyncio.run(first_piece()) == "x" * 8
    (request,) = fake.requests
    deadline = time.monotonic() + 3
    while not request.disconnected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request.disconnected


def test_one_provider_serves_several_event_loops(fake: FakeOpenAIServer) -> None:
    """Pooled connections belong to one loop: a second asyncio.run must not reuse them."""
    provider = OpenAICompatibleProvider("fake", base_url=fake.base_url)
    for _ in range(2):
        assert asyncio.run(provider.complete(ASK)).text.startswith("m answer")
    asyncio.run(provider.aclose())


def test_a_refused_connection_names_the_cause() -> None:
    provider = OpenAICompatibleProvider("down", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ProviderConnectionError, match="connection failed"):
        asyncio.run(provider.complete(ASK))
