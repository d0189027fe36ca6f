"""What clients other than a plain chat call need from `moa serve`: the Responses API, legacy
completions, CORS, parameters honoured or refused, failures a retry cannot fix. Driven by the
official `openai` client (and raw HTTP where the wire matters) against the real server, with
the fake OpenAI server upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import httpx2
import openai
import pytest

from moa.engine import MoA, open_pipelines
from moa.results import Event
from moa.server import BackgroundServer, create_app
from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import ConfigMaker, closed_after_test
from tests.test_server import (
    CHAT,
    KEY,
    NO_RETRY,
    Serve,
    assert_openai_error,
    client,
    post,
    request,
    serve,
    shared,
)

__all__ = ["serve", "shared"]  # fixtures, imported for pytest to find

RESPONSES = "/v1/responses"
COMPLETIONS = "/v1/completions"


def post_to(server: BackgroundServer, path: str, payload: dict[str, Any]) -> httpx2.Response:
    return httpx2.post(f"{server.url}{path}", json=payload, timeout=30)


def events(server: BackgroundServer, path: str, payload: dict[str, Any]) -> list[tuple[str, str]]:
    """(event name, data) of each server-sent event; the name is "" where none was given."""
    found: list[tuple[str, str]] = []
    name = ""
    with httpx2.stream("POST", f"{server.url}{path}", json=payload, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                found.append((name, line.removeprefix("data: ")))
                name = ""
    return found


# --- Responses API --------------------------------------------------------------------------


def test_responses_text_in_text_out_with_usage(serve: Serve, fake: FakeOpenAIServer) -> None:
    fake.script("p1", Reply(text="four", usage=(10, 5)))
    fake.script("p2", Reply(text="4", usage=(20, 6)))
    fake.script("agg", Reply(text="2+2 is 4.", usage=(100, 7)))
    server = serve()
    response = client(server).responses.create(
        model="moa", input="What is 2+2?", instructions="Be brief.", max_output_tokens=50
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "completed" and response.model == "moa"
    assert response.output_text == "2+2 is 4."
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (130, 18)
    assert response.usage.total_tokens == 148
    (aggregator,) = fake.requests_for("agg")
    assert aggregator.body["max_tokens"] == 50
    assert "Be brief." in aggregator.text and "What is 2+2?" in aggregator.text
    assert [a["model"] for a in (response.model_extra or {})["moa"]["layers"][0]] == ["p1", "p2"]


def test_responses_take_a_conversation_of_messages_and_parts(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    server = serve(pipeline={"aggregator": {"model": "agg"}, "layers": 1})
    client(server).responses.create(
        model="moa",
        input=[
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
            {  # type: ignore[misc, list-item]  # an output item sent back: valid, but not typed so
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Bonjour", "annotations": []}],
            },
            {"role": "user", "content": [{"type": "input_text", "text": "And goodbye?"}]},
        ],
    )
    messages = fake.requests[0].messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == "Bonjour" and messages[3]["content"] == "And goodbye?"


def test_responses_stream_sends_the_responses_event_types(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    fake.script("agg", Reply(text="abcdefgh" * 4, usage=(50, 8)))
    server = serve()
    with client(server).responses.create(model="moa", input="Hi", stream=True) as stream:
        received = list(stream)
    kinds = [e.type for e in received]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in received] == list(range(1, len(received) + 1))
    deltas = "".join(e.delta for e in received if e.type == "response.output_text.delta")
    assert deltas == "abcdefgh" * 4
    final = received[-1].response  # type: ignore[union-attr]
    assert final.output_text == deltas and final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens > 8
    # On the wire, every event carries its name (the SDK reads the data's type).
    wire = events(server, RESPONSES, {"model": "moa", "input": "Hi", "stream": True})
    assert all(name == json.loads(data)["type"] for name, data in wire)


def test_responses_stream_reports_a_failed_run_as_response_failed(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    fake.script("agg", Reply(status=500))
    server = serve(pipeline=NO_RETRY)
    wire = events(server, RESPONSES, {"model": "moa", "input": "Hi", "stream": True})
    name, data = wire[-1]
    assert name == "response.failed"
    failed = json.loads(data)["response"]
    assert failed["status"] == "failed" and "aggregator failed" in failed["error"]["message"]


def test_responses_hitting_the_token_cap_are_incomplete(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    fake.script("agg", Reply(text="cut short", finish_reason="length"))
    server = serve()
    response = client(server).responses.create(model="moa", input="Hi", max_output_tokens=16)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        pytest.param({"tools": [{"type": "function", "name": "f"}]}, "tools", id="tools"),
        pytest.param({"previous_response_id": "resp_1"}, "previous_response_id", id="stored"),
        pytest.param({"text": {"format": {"type": "json_object"}}}, "text.format", id="json"),
        pytest.param({"reasoning": {"effort": "high"}}, "reasoning.effort", id="reasoning"),
        pytest.param({"stream_options": {"include_usage": True}}, "stream_options", id="opts"),
        pytest.param(
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
            id="image",
        ),
        pytest.param(
            {"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
            "input[0].type",
            id="tool-output",
        ),
        pytest.param(
            {"instructions": "Be brief.", "input": [{"role": "assistant", "content": "Sure"}]},
            "input[0]",
            id="prefill",
        ),
        pytest.param({"input": 3}, "input", id="input-not-text"),
    ],
)
def test_responses_refuse_what_they_cannot_honour_naming_the_field(
    shared: BackgroundServer, fake: FakeOpenAIServer, fields: dict[str, Any], param: str
) -> None:
    payload = {"model": "moa", "input": "Hi", **fields}
    error = assert_openai_error(post_to(shared, RESPONSES, payload), 400, param=param)
    assert error["type"] == "invalid_request_error"
    assert fake.requests == []


# --- legacy completions ---------------------------------------------------------------------


def test_completions_answer_a_prompt_with_usage(serve: Serve, fake: FakeOpenAIServer) -> None:
    fake.script("agg", Reply(text="Paris.", usage=(40, 2)))
    server = serve()
    answer = client(server).completions.create(
        model="moa", prompt="The capital of France?", max_tokens=30, temperature=0.2
    )
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-")
    assert answer.choices[0].text == "Paris." and answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.total_tokens > 42
    (aggregator,) = fake.requests_for("agg")
    assert (aggregator.body["max_tokens"], aggregator.body["temperature"]) == (30, 0.2)
    assert fake.requests_for("p1")[0].messages[-1] == {
        "role": "user",
        "content": "The capital of France?",
    }


def test_completions_stream_text_chunks_and_usage(serve: Serve, fake: FakeOpenAIServer) -> None:
    fake.script("agg", Reply(text="abcdefgh" * 3))
    server = serve()
    stream = client(server).completions.create(
        model="moa", prompt="Hi", stream=True, stream_options={"include_usage": True}
    )
    with stream:
        chunks = list(stream)
    assert {c.object for c in chunks} == {"text_completion"}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "abcdefgh" * 3
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        pytest.param({"prompt": ["a", "b"]}, "prompt", id="several-prompts"),
        pytest.param({"prompt": [1, 2, 3]}, "prompt", id="token-ids"),
        pytest.param({"echo": True}, "echo", id="echo"),
        pytest.param({"suffix": "end"}, "suffix", id="suffix"),
        pytest.param({"logprobs": 2}, "logprobs", id="logprobs"),
        pytest.param({"best_of": 3}, "best_of", id="best-of"),
        pytest.param({"logit_bias": {"50256": -100}}, "logit_bias", id="logit-bias"),
        pytest.param({"stream_options": {"include_usage": True}}, "stream_options", id="opts"),
        pytest.param({"stop": "\n"}, "stop", id="stop"),
        pytest.param({"n": 2}, "n", id="n"),
        # Several refused fields: the 400 names the first in a fixed order (stop comes last).
        pytest.param({"stop": "\n", "echo": True}, "echo", id="stop-and-echo"),
        pytest.param({"stop": "\n", "logprobs": 1}, "logprobs", id="stop-and-logprobs"),
        pytest.param({"best_of": 3, "n": 2}, "n", id="n-and-best-of"),
    ],
)
def test_completions_refuse_what_they_cannot_honour_naming_the_field(
    shared: BackgroundServer, fake: FakeOpenAIServer, fields: dict[str, Any], param: str
) -> None:
    payload = {"model": "moa", "prompt": "Hi", **fields}
    assert_openai_error(post_to(shared, COMPLETIONS, payload), 400, param=param)
    assert fake.requests == []
    with pytest.raises(openai.BadRequestError):
        client(shared).completions.create(**payload)


# --- chat parameters and messages -----------------------------------------------------------


def test_seed_and_penalties_reach_the_aggregator_only(serve: Serve, fake: FakeOpenAIServer) -> None:
    server = serve()
    client(server).chat.completions.create(
        **request(), seed=1234, presence_penalty=0.5, frequency_penalty=-0.25, user="end-user-7"
    )
    aggregator = fake.requests_for("agg")[0].body
    assert aggregator["seed"] == 1234
    assert (aggregator["presence_penalty"], aggregator["frequency_penalty"]) == (0.5, -0.25)
    for proposer in fake.requests_for("p1") + fake.requests_for("p2"):
        assert not {"seed", "presence_penalty", "frequency_penalty"} & set(proposer.body)
    # The end user is served by every call of the run, so every call names them.
    assert {r.body.get("user") for r in fake.requests} == {"end-user-7"}


def test_without_a_user_no_call_names_one(serve: Serve, fake: FakeOpenAIServer) -> None:
    client(serve()).chat.completions.create(**request())
    assert fake.requests and all("user" not in r.body for r in fake.requests)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        pytest.param({"logit_bias": {"50256": -100}}, "logit_bias", id="logit-bias"),
        pytest.param({"reasoning_effort": "low"}, "reasoning_effort", id="reasoning-effort"),
        pytest.param({"stream_options": {"include_usage": True}}, "stream_options", id="opts"),
    ],
)
def test_chat_parameters_a_pipeline_cannot_honour_are_refused_by_name(
    shared: BackgroundServer, fake: FakeOpenAIServer, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client(shared).chat.completions.create(**request(), **fields)
    assert raised.value.param == param
    assert fake.requests == []


def test_a_final_assistant_message_is_refused_as_a_prefill(
    shared: BackgroundServer, fake: FakeOpenAIServer
) -> None:
    messages = [
        {"role": "user", "content": "Write a haiku about rain."},
        {"role": "assistant", "content": "Soft rain on"},
    ]
    error = assert_openai_error(post(shared, request(messages=messages)), 400, param="messages[1]")
    assert error["code"] == "unsupported_prefill"
    assert "prefill" in error["message"] and "End with a user message" in error["message"]
    assert fake.requests == []


# --- CORS -----------------------------------------------------------------------------------

ORIGIN = "http://localhost:3000"


def test_without_cors_origins_no_cross_origin_access_is_granted(shared: BackgroundServer) -> None:
    response = httpx2.post(f"{shared.url}{CHAT}", json=request(), headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_a_cors_origin_gets_preflight_and_headers_even_on_refusals(serve: Serve) -> None:
    server = serve(cors_origins=[ORIGIN], api_keys=[KEY])
    preflight = httpx2.options(
        f"{server.url}{CHAT}",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "x-stainless-os" in allowed
    # Bearer keys need no cookies: credentials mode stays off.
    assert "access-control-allow-credentials" not in preflight.headers

    headers = {"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"}
    answered = httpx2.post(f"{server.url}{CHAT}", json=request(), headers=headers)
    assert answered.status_code == 200
    assert answered.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in answered.headers["access-control-expose-headers"]
    refused = httpx2.post(f"{server.url}{CHAT}", json=request(), headers={"Origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN

    other = httpx2.options(
        f"{server.url}{CHAT}",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers


# --- failures a retry cannot fix ------------------------------------------------------------


def retrying_client(server: BackgroundServer) -> openai.OpenAI:
    """The SDK as users have it: retries on (twice, its default)."""
    api = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=2, timeout=30)
    return closed_after_test(api)


def test_an_upstream_refusal_is_not_retried_by_the_sdk(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    fake.respond("agg", lambda body, n: Reply(status=401, body='{"error": {"message": "no"}}'))
    server = serve(pipeline=NO_RETRY)
    response = post(server, request())
    error = assert_openai_error(response, 502)
    assert error["code"] == "upstream_rejected"
    assert response.headers["x-should-retry"] == "false"
    fake.reset()
    fake.respond("agg", lambda body, n: Reply(status=401, body='{"error": {"message": "no"}}'))
    with pytest.raises(openai.InternalServerError):
        retrying_client(server).chat.completions.create(**request())
    assert len(fake.requests_for("agg")) == 1  # one run, not three
    assert len(fake.requests_for("p1")) == 1


def test_a_conversation_too_long_for_the_models_is_the_requests_fault(
    serve: Serve, fake: FakeOpenAIServer
) -> None:
    overflow = '{"error": {"message": "maximum context length exceeded"}}'
    fake.respond("*", lambda body, n: Reply(status=400, body=overflow))
    server = serve(pipeline=NO_RETRY)
    with pytest.raises(openai.BadRequestError) as raised:
        retrying_client(server).chat.completions.create(**request())
    assert raised.value.code == "context_length_exceeded"
    assert "shorten it" in raised.value.message
    assert len(fake.requests_for("p1")) == 1  # not retried


def test_a_transient_failure_stays_retryable(serve: Serve, fake: FakeOpenAIServer) -> None:
    fake.script("agg", Reply(status=503))
    server = serve(pipeline=NO_RETRY)
    answer = retrying_client(server).chat.completions.create(**request())
    assert answer.choices[0].message.content == "agg answer 1"  # the SDK's retry succeeded
    assert len(fake.requests_for("agg")) == 2


# --- a bug in the server --------------------------------------------------------------------


class _BuggyMoA(MoA):
    """A pipeline whose run raises what no run should (a bug, not a RunError)."""

    async def stream(self, prompt: Any, *args: Any, **kwargs: Any) -> AsyncGenerator[Event, None]:
        raise ZeroDivisionError("a bug")
        yield  # pragma: no cover - makes this an async generator


@pytest.fixture
def buggy(make_config: ConfigMaker) -> Iterator[BackgroundServer]:
    working = open_pipelines(make_config(**NO_RETRY))["moa"]
    moa = _BuggyMoA(working.pipeline, working.providers, name="moa")
    with BackgroundServer(create_app({"moa": moa})) as server:
        yield server


def test_a_bug_in_a_run_is_an_internal_error_on_every_endpoint(
    buggy: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The client learns that the server failed, in its endpoint's format; never a traceback."""
    internal = {"code": "internal", "message": "internal error: see the server log"}
    error = assert_openai_error(post(buggy, request()), 500)
    assert error["code"] == "internal" and error["type"] == "server_error"
    chat = events(buggy, CHAT, request(stream=True))
    assert json.loads(chat[-1][1])["error"] == {**internal, "type": "server_error", "param": None}
    name, data = events(buggy, RESPONSES, {"model": "moa", "input": "Hi", "stream": True})[-1]
    assert name == "response.failed" and json.loads(data)["response"]["error"] == internal
    run = json.loads(events(buggy, "/v1/moa/runs", request())[-1][1])
    assert {k: run[k] for k in ("type", "code", "message", "result")} == {
        "type": "error",
        **internal,
        "result": None,
    }
    # The log, with the traceback, says which failed: a stream of answer text or a run's events.
    failures = [r.getMessage().partition("(model moa): ")[2] for r in caplog.records]
    assert failures.count("the stream failed") == 2 and failures.count("the run failed") == 1
