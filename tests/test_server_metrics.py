"""`moa serve --metrics`: /metrics scraped over real HTTP after real runs, parsed with
prometheus-client's own parser."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moa.config import parse_config
from moa.engine import open_pipelines
from moa.server import BackgroundServer, create_app
from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import agents, closed_after_test

KEY = "metrics-test-key-0123456789"


@pytest.fixture
def serve(fake: FakeOpenAIServer) -> Iterator[Any]:
    started: list[BackgroundServer] = []

    def start(**options: Any) -> BackgroundServer:
        config = parse_config(
            {
                "pipelines": {
                    "duo": {
                        "proposers": agents("p1", "p2"),
                        "aggregator": {"model": "agg"},
                        "max_attempts": 1,
                    },
                    "solo": {"aggregator": {"model": "agg"}, "layers": 1},
                },
                "providers": {
                    "fake": {
                        "base_url": fake.base_url,
                        "prices": {"*": {"input": 1.0, "output": 2.0}},
                    }
                },
            }
        )
        server = BackgroundServer(create_app(open_pipelines(config), **options)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_runs_calls_tokens_and_cost(
    fake: FakeOpenAIServer, serve: Any
) -> None:
    fake.script("p2", Reply(status=500))
    server = serve(metrics=True)
    client = closed_after_test(
        openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    )
    client.chat.completions.create(model="duo", messages=[{"role": "user", "content": "a?"}])
    stream = client.chat.completions.create(
        model="solo", messages=[{"role": "user", "content": "b?"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "c"}])
    fake.script("agg", Reply(status=400))
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="solo", messages=[{"role": "user", "content": "d"}])

    response = httpx2.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)

    assert _value(samples, "moa_requests_total", pipeline="duo", status="200") == 1
    assert _value(samples, "moa_requests_total", pipeline="solo", status="200") == 1
    assert _value(samples, "moa_requests_total", pipeline="solo", status="502") == 1
    assert _value(samples, "moa_requests_total", pipeline="", status="404") == 1
    assert _value(samples, "moa_runs_total", pipeline="duo", outcome="ok") == 1
    assert _value(samples, "moa_runs_total", pipeline="solo", outcome="ok") == 1
    assert _value(samples, "moa_runs_total", pipeline="solo", outcome="failed") == 1
    assert _value(samples, "moa_run_duration_seconds_count", pipeline="duo") == 1
    assert _value(samples, "moa_run_duration_seconds_sum", pipeline="duo") > 0
    assert _value(samples, "moa_time_to_first_token_seconds_count", pipeline="solo") == 1
    calls = {"provider": "fake"}
    assert _value(samples, "moa_upstream_calls_total", **calls, model="p1", outcome="ok") == 1
    assert _value(samples, "moa_upstream_calls_total", **calls, model="p2", outcome="failed") == 1
    assert _value(samples, "moa_upstream_calls_total", **calls, model="agg", outcome="ok") == 2
    assert _value(samples, "moa_upstream_calls_total", **calls, model="agg", outcome="failed") == 1
    prompt = _value(samples, "moa_tokens_total", pipeline="duo", kind="prompt")
    completion = _value(samples, "moa_tokens_total", pipeline="duo", kind="completion")
    assert prompt > 0 and completion > 0
    cost = _value(samples, "moa_cost_usd_total", pipeline="duo")
    assert cost == pytest.approx((prompt * 1.0 + completion * 2.0) / 1e6)
    assert _value(samples, "moa_runs_in_flight", pipeline="duo") == 0
    assert ("moa_runs_in_flight", (("pipeline", "solo"),)) in samples


def test_runs_of_every_endpoint_count(fake: FakeOpenAIServer, serve: Any) -> None:
    server = serve(metrics=True)
    client = closed_after_test(
        openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    )
    client.responses.create(model="solo", input="a?")
    client.completions.create(model="solo", prompt="b?")
    samples = _samples(httpx2.get(f"{server.url}/metrics", timeout=10).text)
    assert _value(samples, "moa_runs_total", pipeline="solo", outcome="ok") == 2
    assert _value(samples, "moa_run_duration_seconds_count", pipeline="solo") == 2


def test_metrics_need_the_api_key_unless_public(fake: FakeOpenAIServer, serve: Any) -> None:
    guarded = serve(metrics=True, api_keys=[KEY])
    assert httpx2.get(f"{guarded.url}/metrics", timeout=10).status_code == 401
    authorized = httpx2.get(
        f"{guarded.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    )
    assert authorized.status_code == 200
    assert "moa_runs_in_flight" in authorized.text

    public = serve(metrics=True, metrics_public=True, api_keys=[KEY])
    assert httpx2.get(f"{public.url}/metrics", timeout=10).status_code == 200
    assert httpx2.get(f"{public.url}/v1/models", timeout=10).status_code == 401


def test_no_metrics_route_without_the_option(fake: FakeOpenAIServer, serve: Any) -> None:
    server = serve()
    assert httpx2.get(f"{server.url}/metrics", timeout=10).status_code == 404
