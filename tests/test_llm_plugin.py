"""The `llm` plugin, driven through llm's own CLI (click's runner) and Python API, with the
plugin installed through its entry point and the fake server upstream."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import llm
import pytest
from click.testing import CliRunner, Result
from llm.cli import cli

from moa.testing import FakeOpenAIServer, Reply

LlmRunner = Callable[..., Result]


@pytest.fixture
def run_llm(fake: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LlmRunner:
    config = tmp_path / "moa.yaml"
    config.write_text(
        f"""
providers:
  fake: {{base_url: "{fake.base_url}"}}
pipelines:
  duo:
    proposers: [{{model: p1}}, {{model: p2}}]
    aggregator: {{model: agg, temperature: 0.7}}
  solo:
    layers: 1
    aggregator: {{model: agg}}
"""
    )
    monkeypatch.setenv("MOA_CONFIG", str(config))
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "llm"))

    def run(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)

    return run


def test_presets_and_config_pipelines_are_models(run_llm: LlmRunner) -> None:
    done = run_llm("models", "list")
    assert done.exit_code == 0, done.output
    for name in ("moa/local", "moa/duo", "moa/solo"):
        assert f"MoA: {name}" in done.output


def test_a_prompt_runs_the_pipeline_with_the_aggregator_options(
    fake: FakeOpenAIServer, run_llm: LlmRunner
) -> None:
    fake.script("agg", Reply(text="Four, as 2 + 2 = 4."))
    done = run_llm(
        "-m", "moa/duo", "--no-stream", "-o", "temperature", "0.1", "-o", "max_tokens", "64", "2+2?"
    )
    assert done.exit_code == 0, done.output
    assert done.output == "Four, as 2 + 2 = 4.\n"
    assert sorted(r.model for r in fake.requests) == ["agg", "p1", "p2"]
    (aggregator,) = fake.requests_for("agg")
    assert aggregator.body["temperature"] == 0.1
    assert aggregator.body["max_tokens"] == 64
    for proposer in fake.requests_for("p1"):  # proposers keep their own settings
        assert proposer.body.get("max_tokens") != 64


def test_streaming_hands_over_text_as_it_comes(fake: FakeOpenAIServer, run_llm: LlmRunner) -> None:
    fake.script("agg", Reply(text="one two three four five six"))
    run_llm("models")  # registration reads MOA_CONFIG
    model = llm.get_model("moa/solo")
    response = model.prompt("count", stream=True)
    chunks = list(response)
    assert len(chunks) > 1
    assert "".join(chunks) == "one two three four five six"
    done = run_llm("-m", "moa/solo", "count")  # streamed by default on the command line
    assert done.exit_code == 0, done.output
    assert done.output.strip() == "agg answer 1"


def test_conversations_pass_the_history_and_logs_record_usage(
    fake: FakeOpenAIServer, run_llm: LlmRunner
) -> None:
    fake.script("agg", Reply(text="Paris."), Reply(text="About 2.1 million."))
    first = run_llm("-m", "moa/solo", "Capital of France?")
    assert first.output.strip() == "Paris."
    follow = run_llm("-c", "How many people live there?")
    assert follow.exit_code == 0, follow.output
    assert follow.output.strip() == "About 2.1 million."
    last = fake.requests_for("agg")[-1]
    assert last.messages == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "How many people live there?"},
    ]

    logs = run_llm("logs", "--json", "-n", "2")
    assert logs.exit_code == 0, logs.output
    entries = json.loads(logs.output)
    assert [e["model"] for e in entries] == ["moa/solo", "moa/solo"]
    assert entries[0]["conversation_id"] == entries[1]["conversation_id"]
    for entry in entries:
        assert entry["input_tokens"] > 0 and entry["output_tokens"] > 0
        (agent,) = entry["response_json"]["agents"]
        assert agent["model"] == "fake/agg" and agent["status"] == "ok"


def test_a_mistyped_option_or_a_failed_run_is_one_error_line(
    fake: FakeOpenAIServer, run_llm: LlmRunner
) -> None:
    done = run_llm("-m", "moa/solo", "-o", "temprature", "1", "hi")
    assert done.exit_code != 0
    assert "temprature" in done.output
    fake.script("agg", Reply(status=400))
    done = run_llm("-m", "moa/solo", "hi")
    assert done.exit_code == 1
    assert done.output.startswith("Error: ")
    assert "Traceback" not in done.output


def test_a_broken_moa_config_is_reported_and_llm_keeps_working(
    run_llm: LlmRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("providers: [oops]\n")
    monkeypatch.setenv("MOA_CONFIG", str(broken))
    done = CliRunner().invoke(cli, ["models", "list"])
    assert done.exit_code == 0
    assert "moa plugin: MOA_CONFIG: " in done.output
    assert "MoA: moa/local" in done.output
