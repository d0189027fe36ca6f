"""The JSON form of every event, and `POST /v1/moa/runs` streaming them over real HTTP."""

from __future__ import annotations

import dataclasses
import json
import re
import time
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moa.config import parse_config
from moa.engine import MoA, open_pipelines
from moa.results import Event, event_from_dict, event_to_dict
from moa.server import BackgroundServer, create_app
from moa.server.events import pipeline_shape
from moa.server.ui import CONTENT_SECURITY_POLICY
from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import ConfigMaker, agents
from tests.test_server_process import ServeProcess, start_serve, write_config

__all__ = ["start_serve"]  # the fixture, used below

PIPELINE: dict[str, Any] = {
    "proposers": agents("p1", "p2"),
    "aggregator": {"model": "agg"},
    "layers": 3,
    "max_attempts": 1,
}
KEY = "events-client-key-0123456789"
RUNS = "/v1/moa/runs"


def _values(kind: Any) -> st.SearchStrategy[Any]:
    """Any value of a type the events are made of, read from the dataclasses' annotations, so
    an event type added later is covered without touching this test."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is float:
        return st.floats(allow_nan=False, allow_infinity=False)  # all JSON has
    if kind is int:
        return st.integers(-(2**53), 2**53)
    if kind in (str, bool, type(None)):
        return st.from_type(kind)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (types.UnionType, typing.Union):
        return st.one_of(*map(_values, args))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return st.lists(_values(args[0]), max_size=2).map(tuple)
    if origin is tuple:
        return st.tuples(*map(_values, args))
    if origin is dict:
        return st.dictionaries(_values(args[0]), _values(args[1]), max_size=2)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        fields = {f.name: _values(hints[f.name]) for f in dataclasses.fields(kind)}
        return st.builds(kind, **fields)
    raise TypeError(f"no strategy for {kind!r}: teach _values about it")


EVENT_TYPES = typing.get_args(Event)


@pytest.mark.parametrize("kind", EVENT_TYPES, ids=lambda k: k.__name__)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_event_type_round_trips_through_json(kind: type, data: st.DataObject) -> None:
    event = data.draw(_values(kind))
    form = event_to_dict(event)
    wire = json.dumps(form, allow_nan=False)  # strict JSON
    assert event_from_dict(json.loads(wire)) == event
    assert isinstance(form["type"], str)


def test_an_unknown_event_type_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown MoA event type 'party'; known: agent_started"):
        event_from_dict({"type": "party"})
    with pytest.raises(TypeError, match="not a MoA event"):
        event_to_dict("hello")  # type: ignore[arg-type]


# --- POST /v1/moa/runs ---------------------------------------------------------------------


@pytest.fixture
def server(make_config: ConfigMaker) -> Iterator[Callable[..., BackgroundServer]]:
    started: list[BackgroundServer] = []

    def start(pipeline: dict[str, Any] | None = None, **options: Any) -> BackgroundServer:
        config = make_config(**(pipeline or PIPELINE))
        app = create_app(open_pipelines(config), **options)
        started.append(BackgroundServer(app).start())
        return started[-1]

    yield start
    for running in started:
        running.stop()


def run_body(model: str = "moa", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}


def read_events(response: httpx2.Response) -> list[dict[str, Any]]:
    """The data of every server-sent event; keep-alive comments are skipped."""
    return [
        json.loads(line.removeprefix("data: "))
        for line in response.iter_lines()
        if line.startswith("data: ")
    ]


def stream_run(url: str, body: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    with httpx2.stream("POST", url + RUNS, json=body, timeout=30, **kwargs) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return read_events(response)


def test_a_run_streams_every_agent_event_then_done(
    fake: FakeOpenAIServer, server: Callable[..., BackgroundServer]
) -> None:
    fake.script("agg", Reply(text="the final answer", chunk_delay=0.01))
    url = server().url
    events = stream_run(url, run_body())
    kinds = [e["type"] for e in events]
    assert kinds[0] == "run_started"
    assert kinds[-1] == "done"
    shape = events[0]
    assert shape["model"] == "moa"
    assert [[a["model"] for a in layer] for layer in shape["layers"]] == [["p1", "p2"]] * 2
    assert shape["aggregator"] == {"provider": "fake", "model": "agg"}
    assert kinds.count("agent_started") == kinds.count("agent_finished") == 5
    times = [e["t"] for e in events]
    assert times == sorted(times)
    text = "".join(e["text"] for e in events if e["type"] == "text_delta")
    assert text == "the final answer"
    # Every agent's own text, proposers and aggregator alike, streams as it is written.
    pieces: dict[tuple[int, int], str] = {}
    for e in events:
        if e["type"] == "agent_text_delta":
            key = (e["layer"], e["index"])
            pieces[key] = pieces.get(key, "") + e["text"]
    assert pieces[(1, 1)] == "p2 answer 0"
    assert pieces[(2, 0)] == "p1 answer 1"
    assert pieces[(3, 0)] == "the final answer"
    # Every library event reads back into the library's types.
    library = [event_from_dict(e) for e in events[1:]]
    done = library[-1]
    assert done.result.output == "the final answer"  # type: ignore[union-attr]
    assert [a.output for a in done.result.layers[0].agents] == ["p1 answer 0", "p2 answer 0"]  # type: ignore[union-attr]
    assert events[-1]["cost"] == {"usd": None, "unpriced_calls": 5}


@pytest.mark.parametrize(
    ("aggregator", "calls"),
    [
        ({}, 1),
        ({"strategy": "confidence"}, 0),  # chosen among the candidates: no aggregator call
        ({"strategy": "vote"}, 0),
        ({"strategy": "select"}, 1),
        ({"window": 2}, 2),  # three candidates, two at a time: two steps
        ({"mode": "staircase"}, None),  # as many steps as the proposers' writing takes
    ],
)
def test_the_run_shape_counts_the_aggregator_calls_its_strategy_makes(
    make_config: ConfigMaker, aggregator: dict[str, Any], calls: int | None
) -> None:
    config = make_config(
        proposers=[{"model": "p1"}, {"model": "p2"}, {"model": "p3"}],
        aggregator={"model": "agg", **aggregator},
    )
    with MoA.from_config(config) as moa:
        assert pipeline_shape(moa)["aggregator_calls"] == calls


def test_done_carries_the_cost_when_prices_are_set(fake: FakeOpenAIServer) -> None:
    fake.script("*", *[Reply(usage=(1000, 500))] * 5)
    prices = {"*": {"input": 2.0, "output": 4.0}}  # dollars per million tokens
    config = parse_config(
        {"providers": {"fake": {"base_url": fake.base_url, "prices": prices}}, **PIPELINE}
    )
    with BackgroundServer(create_app(open_pipelines(config))) as running:
        events = stream_run(running.url, run_body())
    # 5 calls of 1000 prompt tokens at $2/M and 500 completion tokens at $4/M.
    assert events[-1]["cost"] == {"usd": pytest.approx(5 * (0.002 + 0.002)), "unpriced_calls": 0}


def test_a_failed_proposer_is_an_event_and_the_answer_still_comes(
    fake: FakeOpenAIServer, server: Callable[..., BackgroundServer]
) -> None:
    fake.script("p2", Reply(status=500))
    events = stream_run(server().url, run_body())
    finished = [e["result"] for e in events if e["type"] == "agent_finished"]
    failed = [r for r in finished if r["status"] == "failed"]
    assert len(failed) == 1
    assert failed[0]["model"] == "p2"
    assert "500" in failed[0]["error"]
    assert events[-1]["type"] == "done"


def test_a_failed_run_ends_with_an_error_event_and_what_was_done(
    fake: FakeOpenAIServer, server: Callable[..., BackgroundServer]
) -> None:
    fake.script("agg", Reply(status=500))
    events = stream_run(server().url, run_body())
    error = events[-1]
    assert error["type"] == "error"
    assert error["code"] == "upstream_failed"
    assert "model 'moa'" in error["message"]
    assert error["result"]["ok"] is False
    assert len(error["result"]["layers"]) == 2


def test_bad_requests_are_refused_before_the_stream_starts(
    fake: FakeOpenAIServer, server: Callable[..., BackgroundServer]
) -> None:
    url = server(max_body_bytes=2000).url
    missing = httpx2.post(url + RUNS, json=run_body("nope"))
    assert missing.status_code == 404
    assert "serves: moa" in missing.json()["error"]["message"]
    empty = httpx2.post(url + RUNS, json={"model": "moa", "messages": []})
    assert empty.status_code == 400
    huge = httpx2.post(url + RUNS, json=run_body(padding="x" * 5000))
    assert huge.status_code == 413
    assert fake.requests == []


def test_runs_need_the_same_key_as_the_rest_of_v1(
    fake: FakeOpenAIServer, server: Callable[..., BackgroundServer]
) -> None:
    url = server(api_keys=[KEY]).url
    refused = httpx2.post(url + RUNS, json=run_body())
    assert refused.status_code == 401
    assert fake.requests == []
    events = stream_run(url, run_body(), headers={"Authorization": f"Bearer {KEY}"})
    assert events[-1]["type"] == "done"
    # The page itself is public: it holds no data, and asks for the key.
    assert httpx2.get(url + "/").status_code == 200


def test_runs_share_the_concurrency_limit(
    fake: FakeOpenAIServer, server: Callable[..., BackgroundServer]
) -> None:
    fake.script("p1", Reply(hang=5))
    url = server(max_concurrency=1).url
    with httpx2.stream("POST", url + RUNS, json=run_body(), timeout=30) as response:
        lines = response.iter_lines()
        next(lines)
        busy = httpx2.post(url + RUNS, json=run_body())
        assert busy.status_code == 429
        assert busy.headers["retry-after"] == "1"


def test_hanging_up_cancels_the_run_and_its_upstream_calls(
    fake: FakeOpenAIServer, server: Callable[..., BackgroundServer]
) -> None:
    fake.script("p1", Reply(hang=30))
    fake.script("p2", Reply(hang=30))
    url = server().url
    with httpx2.stream("POST", url + RUNS, json=run_body(), timeout=30) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the connection
        for line in lines:
            if '"agent_started"' in line and '"index":1' in line:
                break
        wait_for(lambda: len(fake.requests) == 2)
    wait_for(lambda: all(r.disconnected for r in fake.requests))
    assert len(fake.requests) == 2  # and the run went no further


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- the page's files ----------------------------------------------------------------------


def test_the_page_is_served_under_a_strict_content_security_policy(
    server: Callable[..., BackgroundServer],
) -> None:
    url = server().url
    page = httpx2.get(url + "/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert policy == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    # No third party: every script and style the page loads is ours.
    for asset in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert asset.startswith("/ui/"), asset
        loaded = httpx2.get(url + asset)
        assert loaded.status_code == 200, asset
        assert loaded.headers["content-security-policy"] == policy
    script = httpx2.get(url + "/ui/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in script.text
    assert httpx2.get(url + "/ui/nothing.js").status_code == 404


def test_moa_serve_no_ui_serves_the_api_only(
    fake: FakeOpenAIServer, tmp_path: Path, start_serve: Callable[..., ServeProcess]
) -> None:
    config = write_config(tmp_path / "moa.yaml", fake)
    served = start_serve("serve", "--config", str(config), "--no-ui")
    assert httpx2.get(served.url + "/").status_code == 404
    assert "web page" not in served.stdout.read_text()
    events = stream_run(served.url, run_body())
    assert events[-1]["type"] == "done"
    served.terminate()


def test_the_readme_client_example_reads_a_run(
    fake: FakeOpenAIServer,
    server: Callable[..., BackgroundServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("A client in a few lines, with `httpx`:")[1]
    code = example.split("```python\n")[1].split("```")[0]
    url = server(pipeline={**PIPELINE, "layers": 2}).url
    code = code.replace("import httpx\n", "import httpx2 as httpx\n")  # the same API
    code = code.replace("http://127.0.0.1:8000", url).replace('"local"', '"moa"')
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert re.search(r"\[p1 #0: ok in \d+\.\d s\]", printed), printed
    assert "agg answer 0" in printed
    assert printed.rstrip().endswith("tokens")


def test_runs_count_in_the_servers_metrics(
    fake: FakeOpenAIServer, server: Callable[..., BackgroundServer]
) -> None:
    url = server(metrics=True).url
    assert stream_run(url, run_body())[-1]["type"] == "done"
    metrics = httpx2.get(url + "/metrics").text
    assert 'moa_runs_total{outcome="ok",pipeline="moa"} 1.0' in metrics
    assert 'moa_upstream_calls_total{model="p1",outcome="ok",provider="fake"} 2.0' in metrics
