"""The `moa` command as users run it: a real subprocess against the fake server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moa.testing import FakeOpenAIServer, Reply

SECRET = "sk-test-5f4dcc3b5aa765d61d8327deb882cf99"


def moa(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moa", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def config(fake: FakeOpenAIServer, tmp_path: Path) -> Path:
    path = tmp_path / "moa.yaml"
    path.write_text(
        f"""
providers:
  fake: {{base_url: "{fake.base_url}"}}
proposers: [{{model: p1}}, {{model: p2}}]
aggregator: {{model: agg}}
layers: 2
"""
    )
    return path


def test_ask_streams_the_answer_to_stdout(fake: FakeOpenAIServer, config: Path) -> None:
    fake.script("agg", Reply(text="Water boils at 100 °C at sea level."))
    done = moa("ask", "--config", str(config), "At what temperature does water boil?")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Water boils at 100 °C at sea level.\n"
    assert len(fake.requests) == 3


def test_ask_json_has_the_documented_keys(fake: FakeOpenAIServer, config: Path) -> None:
    done = moa("ask", "--config", str(config), "--json", "q?")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) >= {"output", "layers", "aggregator", "usage", "latency_s", "ttft_s"}
    assert data["output"] == "agg answer 0"
    (layer,) = data["layers"]
    assert [a["model"] for a in layer] == ["p1", "p2"]
    for agent in [*layer, data["aggregator"]]:
        assert set(agent) >= {"model", "provider", "output", "ok", "error", "latency_s", "usage"}
        assert agent["ok"] is True and agent["provider"] == "fake"
    # One usage shape everywhere (the server's, each agent's, batch records'): with the total.
    usage = data["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < data["ttft_s"] <= data["latency_s"]


def test_ask_reads_the_prompt_from_stdin(fake: FakeOpenAIServer, config: Path) -> None:
    done = moa("ask", "--config", str(config), "-", stdin="A question from a pipe\n")
    assert done.returncode == 0, done.stderr
    assert fake.requests[0].messages[-1]["content"] == "A question from a pipe\n"


def test_a_bad_config_is_exit_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("providers: {x: {base_url: http://h/v1}}\naggregator: {model: m}\nlayer: 2\n")
    done = moa("ask", "--config", str(path), "q")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith(f"error: {path}: layer: unknown key")
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_several_pipelines_without_one_chosen_name_the_pipeline_option(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    path = tmp_path / "pipelines.yaml"
    path.write_text(
        f'providers: {{fake: {{base_url: "{fake.base_url}"}}}}\n'
        "pipelines:\n  fast: {aggregator: {model: a}, layers: 1}\n"
        "  best: {aggregator: {model: b}, layers: 1}\n"
    )
    done = moa("ask", "-c", str(path), "q")
    assert done.returncode == 2 and not fake.requests
    assert done.stderr.strip() == (
        "error: the config defines pipelines fast, best: choose one with --pipeline NAME "
        "(in Python: pipeline='NAME')"
    )
    chosen = moa("ask", "-c", str(path), "--pipeline", "best", "q")
    assert chosen.returncode == 0, chosen.stderr
    assert [r.model for r in fake.requests] == ["b"]


def test_bad_usage_is_exit_2(config: Path) -> None:
    done = moa("ask", "--config", str(config), "--preset", "local", "q")
    assert done.returncode == 2 and "either --config or --preset" in done.stderr
    assert moa("ask").returncode == 2


def test_a_missing_key_is_exit_2_and_no_request_is_sent(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    path = tmp_path / "keyed.yaml"
    path.write_text(
        f'providers: {{fake: {{base_url: "{fake.base_url}", api_key_env: MOA_TEST_KEY}}}}\n'
        "layers: 1\naggregator: {model: agg}\n"
    )
    done = moa("ask", "--config", str(path), "q", env={"MOA_TEST_KEY": ""})
    assert done.returncode == 2
    assert "MOA_TEST_KEY" in done.stderr
    assert fake.requests == []


def test_a_missing_env_file_is_exit_2_with_one_line(
    fake: FakeOpenAIServer, config: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "keys.env"
    done = moa("ask", "--config", str(config), "--env-file", str(missing), "q")
    assert done.returncode == 2 and fake.requests == []
    assert done.stderr == f"error: {missing}: no such .env file\n"
    config.write_text(config.read_text() + "env_file: keys.env\n")  # the config's own, too
    done = moa("ask", "--config", str(config), "q")
    assert done.returncode == 2 and done.stderr == f"error: {missing}: no such .env file\n"


def test_a_failed_run_is_exit_1_with_one_line(fake: FakeOpenAIServer, config: Path) -> None:
    fake.script("p1", Reply(status=401))
    fake.script("p2", Reply(status=403))
    done = moa("ask", "--config", str(config), "q")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: layer 1: 0 of 2 agents succeeded")


def test_an_answer_that_dies_midway_is_exit_1_and_json_says_ok_false(
    fake: FakeOpenAIServer, config: Path
) -> None:
    fake.script("agg", Reply(text="It was the best of times, it was", cut_after_chunks=2))
    done = moa("ask", "--config", str(config), "--json", "q")
    assert done.returncode == 1
    data = json.loads(done.stdout)
    assert data["ok"] is False and data["output"] == "It was the best "
    assert "error" in done.stderr


def test_the_key_never_appears_in_any_output_even_with_verbose(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    path = tmp_path / "keyed.yaml"
    path.write_text(
        f'providers: {{fake: {{base_url: "{fake.base_url}", api_key_env: MOA_TEST_KEY}}}}\n'
        "proposers: [{model: p1}, {model: p2}]\naggregator: {model: agg}\n"
    )
    # An upstream that echoes the key back in its error body, as some do.
    fake.script("p1", Reply(status=401, body=f'{{"error": {{"message": "bad key {SECRET}"}}}}'))
    for args in (["-v", "ask", "--json"], ["-v", "ask"]):
        done = moa(*args, "--config", str(path), "q", env={"MOA_TEST_KEY": SECRET})
        assert done.returncode == 0, done.stderr
        assert SECRET not in done.stdout + done.stderr
        assert "DEBUG" in done.stderr  # -v really logged
    assert fake.requests[0].headers["authorization"] == f"Bearer {SECRET}"


def test_no_authorization_header_without_a_key(fake: FakeOpenAIServer, config: Path) -> None:
    assert moa("ask", "--config", str(config), "q").returncode == 0
    assert all("authorization" not in r.headers for r in fake.requests)


def test_chat_keeps_the_history_across_turns(fake: FakeOpenAIServer, config: Path) -> None:
    done = moa("chat", "--config", str(config), stdin="first question\nsecond question\n/exit\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["agg answer 0", "agg answer 1"]
    last = fake.requests_for("agg")[-1].messages
    turns = [m for m in last if m["role"] != "system"]
    assert turns == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "agg answer 0"},
        {"role": "user", "content": "second question"},
    ]


def test_chat_reports_a_failed_turn_and_goes_on(fake: FakeOpenAIServer, config: Path) -> None:
    fake.script("p1", Reply(status=400))
    fake.script("p2", Reply(status=400))
    done = moa("chat", "--config", str(config), stdin="one\ntwo\n")
    assert done.returncode == 0
    assert "error: layer 1" in done.stderr
    assert done.stdout.splitlines() == ["agg answer 0"]


def test_presets_lists_every_preset() -> None:
    from moa.presets import PRESETS

    done = moa("presets")
    assert done.returncode == 0
    for name in PRESETS:
        assert f"\n{name}  " in f"\n{done.stdout}"
    assert "Qwen/Qwen1.5-110B-Chat" in done.stdout


def test_version_and_help() -> None:
    from moa import __version__

    assert moa("--version").stdout.strip() == f"moa, version {__version__}"
    help_text = moa("--help").stdout
    for command in ("ask", "chat", "presets"):
        assert command in help_text
