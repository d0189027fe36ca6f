"""OpenTelemetry spans of real runs, read back through the SDK's in-memory exporter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from moa import LayerFailed, tracing
from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import ConfigMaker, MoAMaker, agents, closed_after_test

QUESTION = "Name a prime number between 10 and 20, secret-question-text."
_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _provider() -> None:
    # The global provider can be set once per process; every test here shares it.
    current = trace.get_tracer_provider()
    if isinstance(current, trace.ProxyTracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    elif not isinstance(current, TracerProvider):  # pragma: no cover
        pytest.skip("another tracer provider is installed")
    else:
        current.add_span_processor(SimpleSpanProcessor(_EXPORTER))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    tracing.capture_content(None)
    yield _EXPORTER
    tracing.capture_content(None)
    _EXPORTER.clear()


def _by_name(finished: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    named: dict[str, list[ReadableSpan]] = {}
    for span in finished:
        named.setdefault(span.name, []).append(span)
    return named


def test_a_two_layer_run_with_a_failing_proposer_gives_the_span_tree(
    fake: FakeOpenAIServer,
    make_moa: MoAMaker,
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_API_KEY", "sk-secret-key-never-in-spans")
    fake.script("bad", *[Reply(status=500)] * 4)
    moa = make_moa(
        proposers=agents("good", "bad"),
        aggregator={"model": "agg", "temperature": 0.3},
        layers=2,
        max_attempts=2,
        max_retry_wait=0.1,
    )
    moa.providers  # noqa: B018 - built already; the key env var above is never read into spans
    result = moa.run(QUESTION)
    assert result.ok

    finished = spans.get_finished_spans()
    named = _by_name(finished)
    (run,) = named["moa.run moa"]
    (layer,) = named["moa.layer 1"]
    assert len(finished) == 1 + 1 + 3  # nothing else: one span per run, layer and call

    assert run.parent is None
    assert layer.parent is not None and layer.parent.span_id == run.context.span_id
    for call in named["chat good"] + named["chat bad"]:
        assert call.parent is not None and call.parent.span_id == layer.context.span_id
        assert call.kind == trace.SpanKind.CLIENT
    (agg,) = named["chat agg"]
    assert agg.parent is not None and agg.parent.span_id == run.context.span_id
    assert {s.context.trace_id for s in finished} == {run.context.trace_id}

    attributes = dict(agg.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "agg"
    assert attributes["gen_ai.request.temperature"] == 0.3
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["gen_ai.usage.input_tokens"] == result.aggregator.usage.prompt_tokens > 0
    assert attributes["gen_ai.usage.output_tokens"] == result.aggregator.usage.completion_tokens
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["server.port"] == fake.port
    assert attributes["moa.layer"] == 2
    assert attributes["moa.agent.index"] == 0
    assert attributes["moa.agent.status"] == "ok"
    assert attributes["moa.agent.attempts"] == 1
    assert agg.status.status_code == StatusCode.UNSET

    (bad,) = named["chat bad"]
    assert bad.status.status_code == StatusCode.ERROR
    assert "500" in (bad.status.description or "")
    assert bad.attributes is not None
    assert bad.attributes["moa.agent.status"] == "failed"
    assert bad.attributes["moa.agent.attempts"] == 2
    assert bad.attributes["moa.layer"] == 1
    assert bad.attributes["moa.agent.index"] == 1
    retries = [e for e in bad.events if e.name == "moa.retry"]
    assert len(retries) == 1 and retries[0].attributes is not None
    assert retries[0].attributes["attempt"] == 1

    assert layer.attributes is not None
    assert layer.attributes["moa.layer.ok"] == 1
    assert layer.status.status_code == StatusCode.UNSET  # min_ok was still met
    assert run.attributes is not None
    assert run.attributes["moa.status"] == "ok"
    assert run.attributes["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens
    assert "moa.ttft_s" in run.attributes

    # Neither the prompt, nor any answer, nor a key is recorded by default.
    dumped = json.dumps([json.loads(s.to_json()) for s in finished])
    assert "secret-question-text" not in dumped
    assert "answer" not in dumped
    assert "sk-secret-key" not in dumped


def test_prompt_and_answer_are_recorded_only_when_asked(
    fake: FakeOpenAIServer, make_moa: MoAMaker, spans: InMemorySpanExporter
) -> None:
    tracing.capture_content(True)
    moa = make_moa(proposers=agents("p1"), aggregator={"model": "agg"}, layers=2)
    moa.run(QUESTION)
    (agg,) = _by_name(spans.get_finished_spans())["chat agg"]
    assert agg.attributes is not None
    sent = json.loads(str(agg.attributes["gen_ai.input.messages"]))
    assert sent[-1]["role"] == "user"
    assert QUESTION in sent[-1]["parts"][0]["content"]
    assert "agg answer 0" in str(agg.attributes["gen_ai.output.messages"])


def test_a_failed_layer_marks_the_layer_and_run_spans_as_errors(
    fake: FakeOpenAIServer, make_moa: MoAMaker, spans: InMemorySpanExporter
) -> None:
    fake.script("p1", Reply(status=400))
    moa = make_moa(proposers=agents("p1"), aggregator={"model": "agg"}, layers=2)
    with pytest.raises(LayerFailed):
        moa.run(QUESTION)
    named = _by_name(spans.get_finished_spans())
    (run,) = named["moa.run moa"]
    (layer,) = named["moa.layer 1"]
    assert run.status.status_code == StatusCode.ERROR
    assert layer.status.status_code == StatusCode.ERROR
    assert run.attributes is not None and run.attributes["error.type"] == "LayerFailed"
    assert "chat agg" not in named


def test_agents_cut_at_a_layer_deadline_are_events_and_cancelled_spans(
    fake: FakeOpenAIServer, make_moa: MoAMaker, spans: InMemorySpanExporter
) -> None:
    fake.script("slow", Reply(hang=30))
    moa = make_moa(proposers=agents("fast", "slow"), aggregator={"model": "agg"}, layer_timeout=0.5)
    moa.run(QUESTION)
    named = _by_name(spans.get_finished_spans())
    (layer,) = named["moa.layer 1"]
    (cut,) = [e for e in layer.events if e.name == "moa.agent.cut_off"]
    assert cut.attributes is not None and cut.attributes["moa.agent.index"] == 1
    (slow,) = named["chat slow"]
    assert slow.attributes is not None and slow.attributes["moa.agent.status"] == "cancelled"


def test_stragglers_cut_off_and_hedged_requests_are_span_events(
    fake: FakeOpenAIServer, make_moa: MoAMaker, spans: InMemorySpanExporter
) -> None:
    fake.script("hung", Reply(hang=60))
    fake.script("p1", Reply(latency=2.0, text="slow start"), Reply(text="hedge answer"))
    moa = make_moa(
        proposers=[{"model": "p1", "hedge_after": 0.3}, *agents("p2", "p3"), {"model": "hung"}],
        aggregator={"model": "agg"},
    )
    moa.run(QUESTION)
    named = _by_name(spans.get_finished_spans())
    (layer,) = named["moa.layer 1"]
    (cut,) = [e for e in layer.events if e.name == "moa.agent.cut_off"]
    assert cut.attributes is not None and cut.attributes["moa.agent.index"] == 3
    assert "straggler" in str(cut.attributes["reason"])
    (p1,) = named["chat p1"]
    assert [e.name for e in p1.events] == ["moa.hedge"]
    assert p1.attributes is not None and p1.attributes["moa.agent.hedge_winner"] == "hedge"


def test_without_opentelemetry_the_engine_imports_none_of_it(fake: FakeOpenAIServer) -> None:
    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"
        "from moa import MoA, parse_config\n"
        "config = parse_config({'providers': {'fake': {'base_url': sys.argv[1]}},\n"
        "    'proposers': [{'model': 'p1'}], 'aggregator': {'model': 'agg'}})\n"
        "with MoA.from_config(config) as moa:\n"
        "    print(moa.run('hi').output)\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, fake.base_url],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["agg answer 0", "[]"]


def test_moa_serve_continues_the_callers_trace(
    fake: FakeOpenAIServer, make_config: ConfigMaker, spans: InMemorySpanExporter
) -> None:
    import openai

    from moa.engine import open_pipelines
    from moa.server import BackgroundServer, create_app

    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    config = make_config(proposers=agents("p1"), aggregator={"model": "agg"})
    with BackgroundServer(create_app(open_pipelines(config))) as server:
        client = closed_after_test(
            openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        )
        client.chat.completions.create(
            model="moa",
            messages=[{"role": "user", "content": QUESTION}],
            extra_headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
        )
    named = _by_name(spans.get_finished_spans())
    (request,) = named["POST /v1/chat/completions"]
    (run,) = named["moa.run moa"]
    assert request.kind == trace.SpanKind.SERVER
    assert request.parent is not None and request.parent.is_remote
    assert f"{request.context.trace_id:032x}" == trace_id
    assert f"{request.parent.span_id:016x}" == parent_id
    assert run.parent is not None and run.parent.span_id == request.context.span_id
    assert request.attributes is not None
    assert request.attributes["http.response.status_code"] == 200
    assert len(named["chat p1"]) == len(named["chat agg"]) == 1


def test_the_cli_exports_spans_as_otel_variables_say(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    config = tmp_path / "moa.yaml"
    config.write_text(
        f"providers: {{fake: {{base_url: '{fake.base_url}'}}}}\n"
        "proposers: [{model: p1}]\naggregator: {model: agg}\n"
    )

    def ask(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "moa", "ask", "--config", str(config), QUESTION],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "OTEL_SERVICE_NAME": "moa-test", **env},
        )

    done = ask(OTEL_TRACES_EXPORTER="console")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "agg answer 0\n"  # spans go to stderr, never into the answer
    assert '"name": "moa.run moa"' in done.stderr
    assert '"name": "chat p1"' in done.stderr
    assert '"service.name": "moa-test"' in done.stderr

    done = ask(OTEL_TRACES_EXPORTER="zipkin-ish")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: OTEL_TRACES_EXPORTER: unknown exporter 'zipkin-ish'; use console, otlp or none"
    ]


def test_the_cli_exports_over_otlp_to_the_endpoint_named(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    import http.server
    import threading

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    received: list[tuple[str, bytes]] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(b"")

        def log_message(self, *args: object) -> None:
            pass

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    config = tmp_path / "moa.yaml"
    config.write_text(
        f"providers: {{fake: {{base_url: '{fake.base_url}'}}}}\n"
        "proposers: [{model: p1}]\naggregator: {model: agg}\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "moa", "ask", "--config", str(config), QUESTION],
            capture_output=True,
            text=True,
            timeout=120,
            env={
                **os.environ,
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_port}",
            },
        )
    finally:
        collector.shutdown()
        collector.server_close()
    assert done.returncode == 0, done.stderr
    assert done.stdout == "agg answer 0\n"
    names, services = [], set()
    for path, body in received:
        assert path == "/v1/traces"
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    services.add(attribute.value.string_value)
            for scope in resource_spans.scope_spans:
                names += [span.name for span in scope.spans]
    assert sorted(names) == ["chat agg", "chat p1", "moa.layer 1", "moa.run moa"]
    assert services == {"moa"}
