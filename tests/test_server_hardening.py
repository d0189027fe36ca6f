"""`moa serve` against hostile clients: deep JSON, unencodable text, redirect fields in any
spelling, slow or greedy connections, and runs cut by the end of the shutdown grace period."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx2
import openai
import pytest

from moa.config import parse_config
from moa.engine import open_pipelines
from moa.errors import ConfigError
from moa.server import BackgroundServer, create_app
from moa.server.guards import parse_api_keys
from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import ConfigMaker, closed_after_test
from tests.test_server import (
    CHAT,
    NO_RETRY,
    TWO_LAYERS,
    Serve,
    assert_openai_error,
    post,
    request,
    sse_data,
    wait_until,
)
from tests.test_server_process import CLIENT_KEYS, ServeProcess, bearer, write_config


@pytest.fixture
def serve(make_config: ConfigMaker) -> Iterator[Serve]:
    started: list[BackgroundServer] = []

    def start(*, grace_period: float = 5.0, **options: Any) -> BackgroundServer:
        app = create_app(open_pipelines(make_config(**TWO_LAYERS)), **options)
        server = BackgroundServer(app, grace_period=grace_period).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def shared(fake_server: FakeOpenAIServer) -> Iterator[BackgroundServer]:
    config = parse_config({"providers": {"fake": {"base_url": fake_server.base_url}}, **TWO_LAYERS})
    with BackgroundServer(create_app(open_pipelines(config))) as server:
        yield server


@pytest.fixture
def start_serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServeProcess:
        workdir = tmp_path / f"serve-{len(started)}"
        workdir.mkdir()
        server = ServeProcess(list(args), env or {}, workdir)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


# --- 8. bodies that used to be 500s ----------------------------------------------------------


def test_json_nested_100000_deep_in_an_ignored_field_is_400(
    shared: BackgroundServer, fake: FakeOpenAIServer
) -> None:
    body = json.dumps(request())[:-1] + ', "ignored": ' + "[" * 100_000 + "]" * 100_000 + "}"
    error = assert_openai_error(post(shared, body.encode()), 400)
    assert error["code"] == "invalid_json" and "nested too deeply" in error["message"]
    assert fake.requests == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            '{"model": "moa", "messages": [{"role": "user", "content": "a \\ud83d b"}]}',
            "messages[0].content",
        ),
        ('{"model": "m\\udc00", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ],
)
def test_lone_surrogates_are_400_naming_the_field(
    shared: BackgroundServer, fake: FakeOpenAIServer, body: str, param: str
) -> None:
    error = assert_openai_error(post(shared, body.encode()), 400, param=param)
    assert error["code"] == "invalid_text" and "lone UTF-16 surrogate" in error["message"]
    assert fake.requests == []


# --- 8. past the grace period ------------------------------------------------------------------


def test_a_request_cut_by_the_end_of_the_grace_period_gets_an_openai_503(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    fake.script("p1", Reply(hang=30))
    server = serve(grace_period=0.3)
    answers: list[httpx2.Response] = []
    asker = threading.Thread(target=lambda: answers.append(post(server, request())))
    asker.start()
    wait_until(lambda: len(fake.requests) == 2)
    server.stop()
    asker.join(10)
    (answer,) = answers
    error = assert_openai_error(answer, 503)
    assert error["code"] == "server_shutting_down" and error["type"] == "server_error"


def test_an_openai_client_cut_by_the_grace_period_gets_its_usual_exception(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    fake.script("p1", Reply(hang=30))
    server = serve(grace_period=0.3)
    api = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=30)
    closed_after_test(api)
    raised: list[BaseException] = []

    def ask() -> None:
        try:
            api.chat.completions.create(**request())
        except openai.APIError as error:
            raised.append(error)

    asker = threading.Thread(target=ask)
    asker.start()
    wait_until(lambda: len(fake.requests) == 2)
    server.stop()
    asker.join(10)
    (error,) = raised
    assert isinstance(error, openai.InternalServerError) and error.status_code == 503
    assert error.code == "server_shutting_down"


def test_a_stream_cut_by_the_end_of_the_grace_period_ends_with_an_error_event(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    fake.script("p1", Reply(hang=30))
    server = serve(grace_period=0.3)
    with httpx2.stream("POST", f"{server.url}{CHAT}", json=request(stream=True)) as response:
        lines = response.iter_lines()
        first = next(lines)
        wait_until(lambda: len(fake.requests) == 2)
        server.stop()
        rest = list(lines)
    data = sse_data([first, *rest])
    assert data[-1] != "[DONE]"
    assert json.loads(data[-1])["error"]["code"] == "server_shutting_down"


# --- 11. redirect fields by a normalised-name rule ---------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"baseURL": "http://attacker.example/v1"}, "baseURL"),
        ({"apiKey": "sk-other"}, "apiKey"),
        ({"openai_api_base": "http://attacker.example/v1"}, "openai_api_base"),
        ({"extra_body": {"base_url": "http://attacker.example/v1"}}, "extra_body.base_url"),
        ({"Base-Url": "http://attacker.example/v1"}, "Base-Url"),
        ({"x-api-key": "k"}, "x-api-key"),
        ({"azureEndpoint": "http://a"}, "azureEndpoint"),
        ({"http_proxy": "http://a"}, "http_proxy"),
    ],
)
def test_redirect_fields_in_any_spelling_are_400(
    shared: BackgroundServer, fake: FakeOpenAIServer, fields: dict[str, object], param: str
) -> None:
    error = assert_openai_error(post(shared, {**request(), **fields}), 400, param=param)
    assert error["code"] == "forbidden_parameter"
    assert fake.requests == []


def test_openai_request_fields_are_not_mistaken_for_redirects(shared: BackgroundServer) -> None:
    fields: dict[str, Any] = {
        "user": "u1",
        "metadata": {"purpose": "test"},
        "prompt_cache_key": "k1",
        "safety_identifier": "s",
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "service_tier": "auto",
        "store": False,
        "parallel_tool_calls": True,
        "web_search_options": {},
        "messages": [{"role": "user", "content": "the url of the host is in headers"}],
    }
    assert post(shared, request(**fields)).status_code == 200


# --- 10. percent-encoded keys in the access log ----------------------------------------------


def test_a_percent_encoded_key_in_a_query_string_is_redacted_from_the_access_log(
    fake: FakeOpenAIServer, tmp_path: Path, start_serve: Callable[..., ServeProcess]
) -> None:
    config = write_config(tmp_path / "moa.yaml", fake)
    server = start_serve(
        "serve",
        "--config",
        str(config),
        # The limits are options of the command; documented values, set explicitly here.
        "--header-timeout",
        "10",
        "--body-timeout",
        "30",
        "--max-client-connections",
        "256",
        env={"MOA_API_KEYS": CLIENT_KEYS[0]},
    )
    key = CLIENT_KEYS[0]
    every_byte = "".join(f"%{b:02X}" for b in key.encode())
    for query in (f"api_key={every_byte}", f"k={quote(key, safe='')}x", f"t={every_byte.lower()}"):
        response = httpx2.get(f"{server.url}/v1/models?{query}", headers=bearer(key))
        assert response.status_code == 200
    server.terminate()
    logs = server.logs()
    assert logs.count("GET /v1/models?") == 3
    assert key not in logs and every_byte not in logs and every_byte.lower() not in logs
    assert key[:8] not in logs


def test_moa_api_keys_with_control_characters_are_refused_without_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_api_keys("good-key-0123456789,bad\x01key-0123456789")
    assert "key 2" in str(caught.value) and "bad" not in str(caught.value)


# --- 12. slow and greedy clients -------------------------------------------------------------


def _connect(server: BackgroundServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (b"" if it just closes)."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def test_slow_headers_are_cut_at_the_header_timeout_while_normal_requests_go_on(
    make_config: ConfigMaker,
) -> None:
    app = create_app(open_pipelines(make_config(**NO_RETRY)))
    with BackgroundServer(app, header_timeout=0.5) as server:
        idle = _connect(server)  # sends nothing at all
        trickle = _connect(server)
        trickle.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        opened = time.monotonic()
        # Normal requests are served meanwhile.
        for _ in range(3):
            assert post(server, request()).status_code == 200
        for sock in (idle, trickle):
            assert _closed_by_server(sock) == b""
            sock.close()
        assert time.monotonic() - opened < 9  # the socket timeout would have raised first
        # A keep-alive connection that answered a request is not cut while in use.
        with httpx2.Client(base_url=server.url) as http:
            for _ in range(2):
                assert http.post(CHAT, json=request()).status_code == 200


def test_a_body_that_does_not_arrive_in_time_is_408(make_config: ConfigMaker) -> None:
    app = create_app(open_pipelines(make_config(**NO_RETRY)), body_timeout=0.5)
    with BackgroundServer(app) as server:
        sock = _connect(server)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 500\r\n\r\n{"model": '
        )
        answer = _closed_by_server(sock)
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_one_client_holds_at_most_max_client_connections(make_config: ConfigMaker) -> None:
    app = create_app(open_pipelines(make_config(**NO_RETRY)))
    with BackgroundServer(app, max_client_connections=3) as server:
        held = [_connect(server) for _ in range(3)]
        extra = _connect(server)
        refusal = _closed_by_server(extra)
        extra.close()
        head, _, body = refusal.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 429")
        assert json.loads(body)["error"]["code"] == "too_many_connections"
        held.pop().close()
        wait_until(lambda: post(server, request()).status_code == 200)
        for sock in held:
            sock.close()


# --- 3. a key's head never reaches API clients -----------------------------------------------


def test_a_clipped_upstream_error_never_hands_part_of_the_key_to_clients(
    fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-upstream-3e9b1c7d5a2f4e6081b9c3d5"
    monkeypatch.setenv("MOA_TEST_UPSTREAM_KEY", key)
    config = parse_config(
        {
            "providers": {
                "fake": {"base_url": fake.base_url, "api_key_env": "MOA_TEST_UPSTREAM_KEY"}
            },
            **NO_RETRY,
        }
    )
    echo = json.dumps({"error": {"message": "x" * 471 + " " + key}})  # cut at 500 characters
    with BackgroundServer(create_app(open_pipelines(config))) as server:
        for _ in range(2):
            fake.script("p1", Reply(status=401, body=echo))
            fake.script("p2", Reply(status=401, body=echo))
        failed = post(server, request())
        assert failed.status_code == 502 and "HTTP 401" in failed.text
        with httpx2.stream("POST", f"{server.url}{CHAT}", json=request(stream=True)) as response:
            events = "\n".join(response.iter_lines())
        assert "HTTP 401" in events
    for text in (failed.text, events):
        assert key[:8] not in text and key[10:18] not in text
