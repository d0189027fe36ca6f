"""`moa serve` for real: uvicorn on loopback, driven by the official `openai` client and raw HTTP,
with the fake OpenAI server upstream."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import openai
import pytest

from moa.config import ConfigFile, parse_config
from moa.engine import open_pipelines
from moa.errors import ConfigError
from moa.server import BackgroundServer, check_exposure, create_app, is_loopback
from moa.server.app import server_state
from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import ConfigMaker, agents, closed_after_test

TWO_LAYERS: dict[str, Any] = {
    "proposers": agents("p1", "p2"),
    "aggregator": {"model": "agg"},
    "layers": 2,
}
#: Failures are final at once: no retry backoff to wait for.
NO_RETRY: dict[str, Any] = {**TWO_LAYERS, "max_attempts": 1}
KEY = "test-client-key-0123456789"
CHAT = "/v1/chat/completions"

Serve = Callable[..., BackgroundServer]


@pytest.fixture
def serve(make_config: ConfigMaker) -> Iterator[Serve]:
    """Start the real server in a thread: serve(pipeline fields or config=..., app options)."""
    started: list[BackgroundServer] = []

    def start(
        config: ConfigFile | None = None,
        *,
        grace_period: float = 5.0,
        pipeline: dict[str, Any] | None = None,
        **options: Any,
    ) -> BackgroundServer:
        config = config or make_config(**(pipeline or TWO_LAYERS))
        app = create_app(open_pipelines(config), **options)
        server = BackgroundServer(app, grace_period=grace_period).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def shared(fake_server: FakeOpenAIServer) -> Iterator[BackgroundServer]:
    """One server for the tests that only need the default pipeline and no app options."""
    config = parse_config({"providers": {"fake": {"base_url": fake_server.base_url}}, **TWO_LAYERS})
    with BackgroundServer(create_app(open_pipelines(config))) as server:
        yield server


def client(server: BackgroundServer, key: str = "unused") -> openai.OpenAI:
    api = openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=30)
    return closed_after_test(api)


def request(model: str = "moa", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "What is 2+2?"}], **fields}


def post(server: BackgroundServer, payload: Any, **kwargs: Any) -> httpx2.Response:
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return httpx2.post(f"{server.url}{CHAT}", content=content, timeout=30, **kwargs)


def assert_openai_error(
    response: httpx2.Response, status: int, param: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def sse_data(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def runs_in_flight(server: BackgroundServer) -> int:
    return server_state(server.server.app).slots.in_use


# --- models ---------------------------------------------------------------------------------


def test_models_list_has_one_model_per_named_pipeline(
    serve: Serve, make_config: ConfigMaker
) -> None:
    config = make_config(
        pipelines={
            "fast": {"aggregator": {"model": "agg"}, "layers": 1},
            "deep": {"proposers": agents("p1", "p2"), "aggregator": {"model": "agg"}},
        }
    )
    server = serve(config)
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["fast", "deep"]
    assert {m.owned_by for m in models.data} == {"moa"}
    assert client(server).models.retrieve("deep").id == "deep"


def test_the_request_model_picks_the_pipeline(
    serve: Serve, make_config: ConfigMaker, fake: FakeOpenAIServer
) -> None:
    config = make_config(
        pipelines={
            "solo": {"aggregator": {"model": "solo-agg"}, "layers": 1},
            "duo": {"proposers": agents("p1"), "aggregator": {"model": "duo-agg"}},
        }
    )
    server = serve(config)
    answer = client(server).chat.completions.create(**request("solo"))
    assert answer.model == "solo"
    assert answer.choices[0].message.content == "solo-agg answer 0"
    assert [r.model for r in fake.requests] == ["solo-agg"]


def test_an_unknown_model_is_404_in_openai_format(
    shared: BackgroundServer, fake: FakeOpenAIServer
) -> None:
    server = shared
    error = assert_openai_error(post(server, request("gpt-4o")), 404, param="model")
    assert error["code"] == "model_not_found"
    assert error["message"].endswith("it serves: moa")
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(**request("gpt-4o"))
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("gpt-4o")
    assert fake.requests == []


# --- non-streamed ---------------------------------------------------------------------------


def test_completion_sums_usage_of_every_upstream_call_and_reports_layers(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    fake.script("p1", Reply(text="four", usage=(10, 5)))
    fake.script("p2", Reply(text="4", usage=(20, 6)))
    fake.script("agg", Reply(text="2+2 is 4.", usage=(100, 7)))
    server = serve()
    answer = client(server).chat.completions.create(**request())
    assert answer.object == "chat.completion"
    assert answer.id.startswith("chatcmpl-")
    assert answer.model == "moa"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == "2+2 is 4."
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (130, 18)
    assert answer.usage.total_tokens == 148

    moa = (answer.model_extra or {})["moa"]
    (layer,) = moa["layers"]
    assert [(a["model"], a["output"], a["status"]) for a in layer] == [
        ("p1", "four", "ok"),
        ("p2", "4", "ok"),
    ]
    assert layer[0]["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert all(a["latency_s"] >= 0 for a in layer)
    assert moa["aggregator"]["model"] == "agg"
    assert moa["aggregator"]["usage"]["completion_tokens"] == 7
    assert moa["usage"]["total_tokens"] == 148


def test_temperature_max_tokens_and_top_p_apply_to_the_aggregator_only(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    server = serve(pipeline={**TWO_LAYERS, "temperature": 0.7, "max_tokens": 200})
    client(server).chat.completions.create(**request(), temperature=0.1, max_tokens=33, top_p=0.5)
    (aggregator,) = fake.requests_for("agg")
    assert (aggregator.body["temperature"], aggregator.body["max_tokens"]) == (0.1, 33)
    assert aggregator.body["top_p"] == 0.5
    for proposer in fake.requests_for("p1") + fake.requests_for("p2"):
        assert (proposer.body["temperature"], proposer.body["max_tokens"]) == (0.7, 200)
        assert "top_p" not in proposer.body


def test_max_completion_tokens_is_the_newer_name_for_max_tokens(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    server = serve()
    client(server).chat.completions.create(**request(), max_completion_tokens=21)
    assert fake.requests_for("agg")[0].body["max_tokens"] == 21


def test_harmless_unknown_fields_are_accepted(
    shared: BackgroundServer, fake: FakeOpenAIServer
) -> None:
    server = shared
    payload = request(user="u-1", presence_penalty=0, metadata={"a": "b"}, n=1, logit_bias={})
    payload["some_future_field"] = {"x": 1}
    response = post(server, payload)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "agg answer 0"


def test_a_failed_run_is_a_502_with_what_the_run_got_done(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    fake.script("p1", Reply(status=500))
    fake.script("p2", Reply(status=500))
    server = serve(pipeline=NO_RETRY)
    response = post(server, request())
    error = assert_openai_error(response, 502)
    assert error["code"] == "upstream_failed"
    assert "layer 1" in error["message"]
    (layer,) = response.json()["moa"]["layers"]
    assert [a["status"] for a in layer] == ["failed", "failed"]
    fake.script("p1", Reply(status=500))
    fake.script("p2", Reply(status=500))
    with pytest.raises(openai.InternalServerError):
        client(server).chat.completions.create(**request())


# --- streamed -------------------------------------------------------------------------------


def test_stream_sends_the_first_content_chunk_as_the_aggregator_starts(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    # Four 8-character pieces, 0.25 s apart: the answer takes over a second to finish.
    fake.script("agg", Reply(text="abcdefgh" * 4, chunk_delay=0.25, usage=(50, 8)))
    server = serve()
    started = time.monotonic()
    first_content: float | None = None
    chunks = []
    with client(server).chat.completions.create(
        **request(), stream=True, stream_options={"include_usage": True}
    ) as stream:
        for chunk in stream:
            chunks.append(chunk)
            if chunk.choices and chunk.choices[0].delta.content and first_content is None:
                first_content = time.monotonic() - started
    finished = time.monotonic() - started
    assert first_content is not None
    assert finished - first_content >= 0.6, (first_content, finished)

    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "abcdefgh" * 4
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == ["stop"]
    moa = (finish[0].model_extra or {})["moa"]
    assert [a["model"] for a in moa["layers"][0]] == ["p1", "p2"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.total_tokens == sum(
        a["usage"]["total_tokens"] for a in [*moa["layers"][0], moa["aggregator"]]
    )
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done_and_has_no_usage_unless_asked(serve: Serve) -> None:
    server = serve()
    with httpx2.stream("POST", f"{server.url}{CHAT}", json=request(stream=True)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        data = sse_data(list(response.iter_lines()))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all("usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "agg answer 0"


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(Reply(status=500), id="aggregator-fails-before-text"),
        pytest.param(Reply(text="q" * 40, cut_after_chunks=2), id="aggregator-cut-midway"),
    ],
)
def test_an_error_after_the_stream_began_is_an_error_event_without_done(
    serve: Serve, fake: FakeOpenAIServer, reply: Reply
) -> None:
    fake.script("agg", reply)
    server = serve(pipeline=NO_RETRY)
    with httpx2.stream("POST", f"{server.url}{CHAT}", json=request(stream=True)) as response:
        assert response.status_code == 200
        data = sse_data(list(response.iter_lines()))
    assert "[DONE]" not in data
    last = json.loads(data[-1])
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert "aggregator failed" in last["error"]["message"]
    assert json.loads(data[0])["choices"][0]["delta"]["role"] == "assistant"

    fake.script("agg", reply)
    stream = client(server).chat.completions.create(**request(), stream=True)
    with stream, pytest.raises(openai.APIError, match="aggregator failed"):
        for _ in stream:
            pass


def test_keep_alive_comments_flow_while_proposers_think(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    fake.script("p1", Reply(latency=0.4))
    fake.script("p2", Reply(latency=0.4))
    server = serve(heartbeat_s=0.05)
    with httpx2.stream("POST", f"{server.url}{CHAT}", json=request(stream=True)) as response:
        lines = list(response.iter_lines())
    assert ": keep-alive" in lines
    assert sse_data(lines)[-1] == "[DONE]"

    fake.script("p1", Reply(latency=0.3))
    with client(server).chat.completions.create(**request(), stream=True) as stream:
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "agg answer 1"


# --- disconnects cancel upstream ------------------------------------------------------------


def test_a_client_that_disconnects_during_the_proposer_layer_cancels_every_upstream_call(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    fake.script("p1", Reply(hang=30))
    fake.script("p2", Reply(hang=30))
    server = serve()
    with httpx2.stream("POST", f"{server.url}{CHAT}", json=request(stream=True)) as response:
        lines = response.iter_lines()  # (a dropped line iterator would close the response)
        next(lines)  # the stream began
        wait_until(lambda: len(fake.requests) == 2)
    wait_until(lambda: all(r.ended is not None for r in fake.requests))
    assert all(r.disconnected for r in fake.requests)
    assert fake.requests_for("agg") == []
    wait_until(lambda: runs_in_flight(server) == 0)


def test_a_client_that_disconnects_mid_answer_cancels_the_aggregator_call(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    fake.script("agg", Reply(text="w" * 160, chunk_delay=0.2))  # twenty pieces: four seconds
    server = serve()
    with httpx2.stream("POST", f"{server.url}{CHAT}", json=request(stream=True)) as response:
        for line in response.iter_lines():
            if '"content":"w' in line:
                break
    (aggregator,) = fake.requests_for("agg")
    wait_until(lambda: aggregator.ended is not None, timeout=2.5)
    assert aggregator.disconnected


def test_a_non_streamed_client_that_gives_up_cancels_upstream(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    fake.script("p1", Reply(hang=30))
    server = serve()
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(f"{server.url}{CHAT}", json=request(), timeout=0.5)
    (proposer,) = fake.requests_for("p1")
    wait_until(lambda: proposer.ended is not None)
    assert proposer.disconnected
    wait_until(lambda: runs_in_flight(server) == 0)


# --- security and bad input -----------------------------------------------------------------


def test_with_keys_every_v1_route_needs_a_valid_bearer_key(serve: Serve) -> None:
    server = serve(api_keys=[KEY, "another-key-abcdefgh"])
    for path, method in (("/v1/models", "GET"), ("/v1/models/moa", "GET"), (CHAT, "POST")):
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key-0123456789"},
            {"Authorization": KEY},
        ):
            response = httpx2.request(
                method, f"{server.url}{path}", headers=headers, json=request()
            )
            error = assert_openai_error(response, 401)
            assert error["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong-key-0123456789").models.list()

    assert [m.id for m in client(server, KEY).models.list()] == ["moa"]
    assert [m.id for m in client(server, "another-key-abcdefgh").models.list()] == ["moa"]
    answer = client(server, KEY).chat.completions.create(**request())
    assert answer.choices[0].message.content == "agg answer 0"
    assert httpx2.get(f"{server.url}/healthz").json() == {"status": "ok"}  # probes need no key


@pytest.mark.parametrize("field", ["base_url", "api_base", "api_key", "API-Key"])
def test_fields_that_would_redirect_or_rekey_upstream_calls_are_400(
    shared: BackgroundServer, fake: FakeOpenAIServer, field: str
) -> None:
    server = shared
    response = post(server, {**request(), field: "http://attacker.example/v1"})
    error = assert_openai_error(response, 400, param=field)
    assert error["code"] == "forbidden_parameter"
    assert fake.requests == []


def test_a_body_over_the_default_1_mib_cap_is_413(
    shared: BackgroundServer, fake: FakeOpenAIServer
) -> None:
    server = shared
    padding = "x" * (1024 * 1024)
    response = post(server, request(padding=padding))
    error = assert_openai_error(response, 413)
    assert "1048576" in error["message"]
    # Just under the cap the body is read and checked (here: an unknown model).
    under = json.dumps(request("nope", padding="x" * (1024 * 1024 - 200))).encode()
    assert len(under) <= 1024 * 1024
    assert_openai_error(post(server, under), 404)
    assert fake.requests == []


def test_the_body_cap_is_configurable(serve: Serve) -> None:
    server = serve(max_body_bytes=200)
    assert_openai_error(post(server, request(padding="y" * 200)), 413)
    assert post(server, request()).status_code == 200


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        pytest.param(b"{not json", None, id="invalid-json"),
        pytest.param(b"", None, id="empty-body"),
        pytest.param(b"[1, 2]", None, id="not-an-object"),
        pytest.param(b'{"model": "moa", "messages": [], "temperature": NaN}', None, id="nan"),
        pytest.param({"model": "moa"}, "messages", id="no-messages"),
        pytest.param({"messages": [{"role": "user", "content": "hi"}]}, "model", id="no-model"),
        pytest.param(request(messages=[]), "messages", id="empty-messages"),
        pytest.param(request(temperature=2.5), "temperature", id="temperature-too-high"),
        pytest.param(request(temperature="hot"), "temperature", id="temperature-not-number"),
        pytest.param(request(top_p=0), "top_p", id="top-p-zero"),
        pytest.param(request(max_tokens=0), "max_tokens", id="max-tokens-zero"),
        pytest.param(request(stream="yes"), "stream", id="stream-not-bool"),
        pytest.param(request(n=2), "n", id="n-2"),
        pytest.param(request(stop=["\n"]), "stop", id="stop"),
        pytest.param(request(stop=["\n"], tools=[{"type": "function"}]), "stop", id="stop+tools"),
        pytest.param(request(tools=[{"type": "function"}]), "tools", id="tools"),
        pytest.param(request(response_format={"type": "json_object"}), "response_format"),
        pytest.param(
            request(
                messages=[{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]
            ),
            "messages[1]",
            id="last-not-user",
        ),
        pytest.param(
            request(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role", id="role"
        ),
        pytest.param(
            request(messages=[{"role": "user", "content": 3}]), "messages[0].content", id="content"
        ),
        pytest.param(
            request(messages=[{"role": "tool", "content": "x", "tool_call_id": "c"}]),
            "messages[0].role",
            id="tool-message",
        ),
        pytest.param(request(logit_bias={"50256": -100}), "logit_bias", id="logit-bias"),
        pytest.param(request(reasoning_effort="high"), "reasoning_effort", id="reasoning-effort"),
        pytest.param(
            request(stream_options={"include_usage": True}), "stream_options", id="opts-no-stream"
        ),
        pytest.param(request(messages=["hi"]), "messages[0]", id="message-not-object"),
    ],
)
def test_bad_requests_are_400_in_openai_format(
    shared: BackgroundServer, fake: FakeOpenAIServer, payload: Any, param: str | None
) -> None:
    server = shared
    error = assert_openai_error(post(server, payload), 400, param=param)
    assert error["type"] == "invalid_request_error"
    assert fake.requests == []


def test_developer_messages_count_as_system_messages(serve: Serve, fake: FakeOpenAIServer) -> None:
    server = serve(pipeline={"aggregator": {"model": "agg"}, "layers": 1})
    client(server).chat.completions.create(
        model="moa",
        messages=[
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        ],
    )
    assert "Answer in French." in fake.requests[0].text


def test_runs_beyond_max_concurrency_get_429_with_retry_after(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    fake.script("p1", Reply(hang=30))
    server = serve(max_concurrency=1)
    with httpx2.stream("POST", f"{server.url}{CHAT}", json=request(stream=True)) as busy:
        lines = busy.iter_lines()
        next(lines)
        refused = post(server, request())
        error = assert_openai_error(refused, 429)
        assert refused.headers["retry-after"] == "1"
        assert error["code"] == "too_many_concurrent_requests"
        with pytest.raises(openai.RateLimitError):
            client(server).chat.completions.create(**request())
    # The hung-up stream gave its slot back.
    wait_until(lambda: runs_in_flight(server) == 0)
    assert post(server, request()).status_code == 200


def test_unknown_routes_and_methods_answer_in_openai_format(shared: BackgroundServer) -> None:
    server = shared
    assert_openai_error(httpx2.get(f"{server.url}/v1/engines"), 404)
    response = httpx2.get(f"{server.url}{CHAT}")
    assert_openai_error(response, 405)
    assert "POST" in response.headers["allow"]


# --- draining -------------------------------------------------------------------------------


def test_while_draining_new_requests_get_503_and_health_says_so(serve: Serve) -> None:
    server = serve()
    assert httpx2.get(f"{server.url}/healthz").status_code == 200
    server.server.begin_draining()
    health = httpx2.get(f"{server.url}/healthz")
    assert (health.status_code, health.json()) == (503, {"status": "draining"})
    refused = post(server, request())
    assert assert_openai_error(refused, 503)["code"] == "server_shutting_down"
    assert refused.headers["connection"] == "close"


def test_shutdown_lets_a_stream_in_flight_finish_and_answers_new_connections_503(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    fake.script("agg", Reply(text="z" * 32, chunk_delay=0.25))
    server = serve(grace_period=10)
    url = server.url
    with httpx2.stream("POST", f"{url}{CHAT}", json=request(stream=True)) as response:
        lines = response.iter_lines()
        next(lines)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        wait_until(lambda: _draining(server))
        # During the grace period the listener stays open: a new connection gets a 503.
        refused = post(server, request())
        assert assert_openai_error(refused, 503)["code"] == "server_shutting_down"
        rest = list(lines)
    stopper.join(10)
    assert not stopper.is_alive()
    with pytest.raises(httpx2.ConnectError):  # and closes once the run in flight is done
        httpx2.get(f"{url}/healthz", timeout=1)
    data = sse_data(rest)
    assert data[-1] == "[DONE]"
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1])
    assert text.endswith("z" * 24)


def test_runs_still_going_at_the_end_of_the_grace_period_are_cancelled_upstream(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    fake.script("p1", Reply(hang=30))
    server = serve(grace_period=0.3)
    with httpx2.stream("POST", f"{server.url}{CHAT}", json=request(stream=True)) as response:
        lines = response.iter_lines()
        next(lines)
        wait_until(lambda: len(fake.requests) == 2)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 5
    (proposer,) = fake.requests_for("p1")
    wait_until(lambda: proposer.ended is not None)
    assert proposer.disconnected


def _draining(server: BackgroundServer) -> bool:
    response = httpx2.get(f"{server.url}/healthz", timeout=1)
    return response.status_code == 503 and response.json() == {"status": "draining"}


# --- concurrency ----------------------------------------------------------------------------


def test_many_concurrent_streams_all_complete(serve: Serve, fake: FakeOpenAIServer) -> None:
    server = serve()

    async def one(api: openai.AsyncOpenAI) -> str:
        stream = await api.chat.completions.create(**request(), stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="unused", max_retries=0
        ) as api:
            return await asyncio.gather(*(one(api) for _ in range(20)))

    answers = asyncio.run(main())
    assert sorted(answers) == sorted(f"agg answer {n}" for n in range(20))
    assert len(fake.requests) == 60


# --- exposure -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("my-host.example", False),
    ],
)
def test_only_loopback_hosts_may_be_served_without_keys(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    check_exposure(host, ["a-client-key-1234"], allow_unauthenticated=False)
    check_exposure(host, [], allow_unauthenticated=True)
    if loopback:
        check_exposure(host, [], allow_unauthenticated=False)
    else:
        with pytest.raises(ConfigError, match="--allow-unauthenticated"):
            check_exposure(host, [], allow_unauthenticated=False)
