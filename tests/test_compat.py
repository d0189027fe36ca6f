"""`moa serve` driven by the frameworks people put in front of it: LangChain's `ChatOpenAI`
(chat completions and its Responses API mode) and LiteLLM, against the real server with the
fake OpenAI server upstream. A change that breaks one of them shows here."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from moa.server import BackgroundServer
from moa.testing import FakeOpenAIServer, Reply
from tests.test_server import Serve, serve

__all__ = ["serve"]  # a fixture, imported for pytest to find

# LiteLLM fetches a model price list over the network at import unless told to use its own.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

with warnings.catch_warnings():
    # Their import-time deprecation notices are theirs to fix, not a failure of ours.
    warnings.simplefilter("ignore")
    import litellm
    from langchain_openai import ChatOpenAI

ONE_LAYER: dict[str, Any] = {"proposers": [{"model": "p1"}], "aggregator": {"model": "agg"}}


@pytest.fixture
def server(serve: Serve) -> Iterator[BackgroundServer]:
    yield serve(pipeline=ONE_LAYER)


@pytest.fixture(autouse=True)
def _quiet_frameworks() -> Iterator[None]:
    """The frameworks warn about their own internals (pydantic, asyncio): not ours to fail on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def chat_model(server: BackgroundServer, **options: Any) -> ChatOpenAI:
    return ChatOpenAI(
        model="moa", base_url=server.base_url, api_key=SecretStr("unused"), max_retries=0, **options
    )


def test_langchain_chat_openai_invokes_and_streams(
    server: BackgroundServer, fake: FakeOpenAIServer
) -> None:
    fake.script("agg", Reply(text="Four.", usage=(30, 2)))
    reply = chat_model(server, temperature=0.1).invoke("What is 2+2?")
    assert reply.content == "Four."
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] > 0
    assert fake.requests_for("agg")[0].body["temperature"] == 0.1

    fake.script("agg", Reply(text="abcdefgh" * 3))
    pieces = [chunk.content for chunk in chat_model(server).stream("Hi")]
    assert "".join(str(p) for p in pieces) == "abcdefgh" * 3


def test_langchain_chat_openai_over_the_responses_api(
    server: BackgroundServer, fake: FakeOpenAIServer
) -> None:
    fake.script("agg", Reply(text="Via responses."))
    reply = chat_model(server, use_responses_api=True).invoke("Hi")
    assert reply.text == "Via responses."
    assert fake.requests_for("agg")  # the pipeline ran

    fake.script("agg", Reply(text="abcdefgh" * 3))
    streamed = "".join(c.text for c in chat_model(server, use_responses_api=True).stream("Hi"))
    assert streamed == "abcdefgh" * 3


def test_langchain_sees_a_refused_parameter_as_a_bad_request(server: BackgroundServer) -> None:
    import openai

    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        chat_model(server, logit_bias={"50256": -100}).invoke("Hi")


def test_litellm_completion_and_streaming(server: BackgroundServer, fake: FakeOpenAIServer) -> None:
    fake.script("agg", Reply(text="From LiteLLM.", usage=(20, 3)))
    reply = litellm.completion(
        model="openai/moa",
        api_base=server.base_url,
        api_key="unused",
        messages=[{"role": "user", "content": "Hi"}],
        num_retries=0,
    )
    assert reply.choices[0].message.content == "From LiteLLM."
    assert reply.usage.total_tokens > 23

    fake.script("agg", Reply(text="abcdefgh" * 3))
    stream = litellm.completion(
        model="openai/moa",
        api_base=server.base_url,
        api_key="unused",
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        num_retries=0,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == "abcdefgh" * 3


def test_litellm_raises_its_bad_request_error_for_a_refused_parameter(
    server: BackgroundServer,
) -> None:
    with pytest.raises(litellm.exceptions.BadRequestError, match="stop"):
        litellm.completion(
            model="openai/moa",
            api_base=server.base_url,
            api_key="unused",
            messages=[{"role": "user", "content": "Hi"}],
            stop=["\n"],
            num_retries=0,
        )
