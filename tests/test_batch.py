"""`moa batch` end to end: the real CLI against the fake server over real HTTP."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from click.testing import CliRunner, Result

from moa.cli import cli
from moa.config import ProviderConfig
from moa.env import Environment
from moa.providers import register_provider_type, registry
from moa.testing import FakeOpenAIServer, RecordedRequest, Reply
from moa.testing.scripted import Answer, ScriptedProvider

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default cache must never be the user's own during tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI points the root logger at its own stderr; put pytest's handlers back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def question(n: int) -> str:
    """Unique and never a substring of another, so the request log can be searched."""
    return f"<question {n:03d}>"


def write_config(path: Path, fake: FakeOpenAIServer, **overrides: Any) -> Path:
    provider: dict[str, Any] = {"base_url": fake.base_url}
    provider.update(overrides.pop("provider", {}))
    config: dict[str, Any] = {
        "providers": {"fake": provider},
        "proposers": [{"model": "p1"}, {"model": "p2"}, {"model": "p3"}],
        "aggregator": {"model": "agg"},
        "layers": 2,
        "max_attempts": 1,
    }
    config.update(overrides)
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def instructions(count: int) -> list[dict[str, Any]]:
    return [{"instruction": question(n), "dataset": "test"} for n in range(count)]


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def batch(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["batch", *map(str, args)], catch_exceptions=False)


def asked(requests: list[RecordedRequest], n: int) -> bool:
    return any(question(n) in r.text for r in requests)


@pytest.fixture
def setup(tmp_path: Path, fake: FakeOpenAIServer) -> dict[str, Path]:
    return {
        "config": write_config(tmp_path / "moa.yaml", fake),
        "input": write_rows(tmp_path / "in.jsonl", instructions(6)),
        "out": tmp_path / "out.jsonl",
    }


# --- resuming ----------------------------------------------------------------------------


def test_a_batch_killed_midway_resumes_without_duplicates_or_recomputation(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    rows = 24
    fake.respond("*", lambda body, n: Reply(latency=0.15))
    config = write_config(tmp_path / "moa.yaml", fake)
    source = write_rows(tmp_path / "in.jsonl", instructions(rows))
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "moa", "batch", str(source), "-o", str(out)]
    command += ["--config", str(config), "--concurrency", "3", "--no-cache"]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy()
    )
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_bytes().count(b"\n") >= 4):
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the batch wrote nothing within 60 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()
    assert process.returncode == -signal.SIGKILL

    before = [json.loads(line) for line in out.read_bytes().split(b"\n")[:-1]]
    finished = {record["id"] for record in before}
    assert 4 <= len(finished) < rows  # killed midway, not at the end
    fake.reset()

    result = batch(source, "-o", out, "--config", config, "--no-cache", "-j", "4")
    assert result.exit_code == 0, result.output

    records = read_output(out)
    assert sorted(r["id"] for r in records) == list(range(rows))  # every id exactly once
    assert all(r["ok"] for r in records)
    assert records[: len(before)] == before  # finished lines untouched
    for n in range(rows):  # finished rows were not asked again; the others were
        assert asked(fake.requests, n) == (n not in finished)


def test_a_torn_last_line_is_dropped_and_its_row_rerun(
    setup: dict[str, Path], fake: FakeOpenAIServer
) -> None:
    assert batch(setup["input"], "-o", setup["out"], "-c", setup["config"]).exit_code == 0
    lines = setup["out"].read_bytes().splitlines(keepends=True)
    torn_id = json.loads(lines[3])["id"]
    setup["out"].write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    fake.reset()

    result = batch(setup["input"], "-o", setup["out"], "-c", setup["config"], "--no-cache")
    assert result.exit_code == 0, result.output
    records = read_output(setup["out"])  # every line parses: the torn one is gone
    assert sorted(r["id"] for r in records) == list(range(6))
    rerun = {n for n in range(6) if asked(fake.requests, n)}
    assert rerun == {n for n in range(6) if n not in {r["id"] for r in records[:3]}}
    assert torn_id in rerun


def test_a_whole_last_line_missing_only_its_newline_is_kept(
    setup: dict[str, Path], fake: FakeOpenAIServer
) -> None:
    assert batch(setup["input"], "-o", setup["out"], "-c", setup["config"]).exit_code == 0
    setup["out"].write_bytes(setup["out"].read_bytes().rstrip(b"\n"))
    fake.reset()
    result = batch(setup["input"], "-o", setup["out"], "-c", setup["config"], "--no-cache")
    assert result.exit_code == 0
    assert fake.requests == []
    assert len(read_output(setup["out"])) == 6


def test_failed_rows_are_recorded_then_retried(
    setup: dict[str, Path], fake: FakeOpenAIServer
) -> None:
    def aggregator(body: dict[str, Any], n: int) -> Reply:
        failing = question(2) in json.dumps(body)
        return Reply(status=400, body='{"error": {"message": "no"}}') if failing else Reply()

    fake.respond("agg", aggregator)
    args: list[str | Path] = [setup["input"], "-o", setup["out"], "-c", setup["config"]]
    first = batch(*args)
    assert first.exit_code == 1
    assert "1 of 6 rows have no answer" in first.stderr
    failed = [r for r in read_output(setup["out"]) if not r["ok"]]
    assert [r["id"] for r in failed] == [2]
    assert "aggregator failed" in failed[0]["error"]
    assert failed[0]["usage"]["total_tokens"] > 0  # the proposers' tokens still count

    fake.reset()
    second = batch(*args)
    assert second.exit_code == 0, second.output
    records = read_output(setup["out"])
    assert sorted(r["id"] for r in records) == list(range(6))  # the failure line is gone
    assert all(r["ok"] for r in records)
    # Only the failed row ran again, and its proposers' answers came from the cache.
    assert {r.model for r in fake.requests} == {"agg"}
    assert len(fake.requests) == 1


def test_multi_turn_rows_carry_earlier_answers_in_the_history(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    config = write_config(tmp_path / "moa.yaml", fake)
    source = write_rows(
        tmp_path / "question.jsonl",
        [{"question_id": 81, "category": "writing", "turns": [question(1), question(2)]}],
    )
    out = tmp_path / "out.jsonl"
    assert batch(source, "-o", out, "-c", config).exit_code == 0
    (record,) = read_output(out)
    assert record["id"] == 81 and len(record["outputs"]) == 2
    second_turn = [r for r in fake.requests if question(2) in r.text and r.model == "p1"]
    assert len(second_turn) == 1
    assert second_turn[0].messages[-3:] == [
        {"role": "user", "content": question(1)},
        {"role": "assistant", "content": record["outputs"][0]},
        {"role": "user", "content": question(2)},
    ]


# --- exports ------------------------------------------------------------------------------


def test_alpaca_eval_export(setup: dict[str, Path]) -> None:
    result = batch(
        setup["input"], "-o", setup["out"], "-c", setup["config"],
        "--format", "alpaca_eval", "--generator", "my-moa",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    exported = json.loads(setup["out"].with_name("out.alpaca_eval.json").read_text())
    assert [e["instruction"] for e in exported] == [question(n) for n in range(6)]
    assert set(exported[0]) == {"instruction", "output", "generator", "dataset"}
    assert all(e["generator"] == "my-moa" and e["dataset"] == "test" for e in exported)
    outputs = {r["id"]: r["output"] for r in read_output(setup["out"])}
    assert [e["output"] for e in exported] == [outputs[n] for n in range(6)]


def test_mt_bench_export(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    config = write_config(tmp_path / "moa.yaml", fake)
    questions = [{"question_id": 80 + n, "turns": [question(n), question(10 + n)]} for n in (1, 2)]
    source = write_rows(tmp_path / "question.jsonl", questions)
    target = tmp_path / "model_answer" / "moa.jsonl"
    out = tmp_path / "out.jsonl"
    result = batch(source, "-o", out, "-c", config, "--format", "mt_bench", "--export", target)
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in target.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 82]
    assert all(a["model_id"] == "moa" for a in answers)  # the config file's name
    records = {r["id"]: r for r in read_output(out)}
    for answer in answers:
        (choice,) = answer["choices"]
        assert choice["index"] == 0
        assert choice["turns"] == records[answer["question_id"]]["outputs"]
        assert len(choice["turns"]) == 2


def test_alpaca_eval_refuses_multi_turn_input_before_running(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    config = write_config(tmp_path / "moa.yaml", fake)
    source = write_rows(tmp_path / "q.jsonl", [{"question_id": 1, "turns": ["a", "b"]}])
    result = batch(source, "-o", tmp_path / "out.jsonl", "-c", config, "--format", "alpaca_eval")
    assert result.exit_code == 2
    assert "single-turn" in result.stderr and "line 1" in result.stderr
    assert fake.requests == []


# --- cache, limits, cost ------------------------------------------------------------------


def test_a_rerun_into_a_new_output_is_served_from_the_cache(
    setup: dict[str, Path], fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    cache = tmp_path / "calls.sqlite3"
    args: list[str | Path] = [setup["input"], "-c", setup["config"], "--cache", cache]
    assert batch(*args, "-o", setup["out"]).exit_code == 0
    assert len(fake.requests) == 6 * 4
    fake.reset()
    again = tmp_path / "again.jsonl"
    result = batch(*args, "-o", again)
    assert result.exit_code == 0
    assert fake.requests == []
    assert "24 hits" in result.stderr

    def outputs(path: Path) -> dict[int, str]:
        return {r["id"]: r["output"] for r in read_output(path)}

    assert outputs(again) == outputs(setup["out"])


def test_no_cache_makes_every_call(setup: dict[str, Path], fake: FakeOpenAIServer) -> None:
    args: list[str | Path] = [setup["input"], "-c", setup["config"], "--no-cache"]
    assert batch(*args, "-o", setup["out"]).exit_code == 0
    assert batch(*args, "-o", setup["out"].with_name("second.jsonl")).exit_code == 0
    assert len(fake.requests) == 2 * 6 * 4


def test_provider_max_concurrency_holds_across_rows(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    fake.respond("*", lambda body, n: Reply(latency=0.05))
    config = write_config(tmp_path / "moa.yaml", fake, provider={"max_concurrency": 2})
    source = write_rows(tmp_path / "in.jsonl", instructions(8))
    result = batch(source, "-o", tmp_path / "out.jsonl", "-c", config, "-j", "8", "--no-cache")
    assert result.exit_code == 0
    assert len(fake.requests) == 8 * 4
    assert fake.max_in_flight == 2


def test_tokens_and_cost_per_agent_row_and_total(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    fake.respond("*", lambda body, n: Reply(usage=(1000, 500)))
    prices = {"agg": {"input": 2.0, "output": 8.0}, "*": {"input": 1.0, "output": 2.0}}
    config = write_config(tmp_path / "moa.yaml", fake, provider={"prices": prices})
    source = write_rows(tmp_path / "in.jsonl", instructions(2))
    out = tmp_path / "out.jsonl"
    result = batch(source, "-o", out, "-c", config, "--progress-interval", "0")
    assert result.exit_code == 0
    proposer, aggregator = 0.001 + 0.001, 0.002 + 0.004  # 1000 in + 500 out, per price
    for record in read_output(out):
        assert record["usage"] == {
            "prompt_tokens": 4000,
            "completion_tokens": 2000,
            "total_tokens": 6000,
        }
        assert record["cost_usd"] == pytest.approx(3 * proposer + aggregator)
        (run,) = record["runs"]
        assert run["usage"] == record["usage"]  # the same shape as the row's and the server's
        assert [a["cost_usd"] for a in run["layers"][0]] == pytest.approx([proposer] * 3)
        assert run["aggregator"]["cost_usd"] == pytest.approx(aggregator)
    assert f"${2 * (3 * proposer + aggregator):.4f}" in result.stderr
    assert "12k tokens" in result.stderr


def test_without_prices_cost_is_null(setup: dict[str, Path]) -> None:
    result = batch(setup["input"], "-o", setup["out"], "-c", setup["config"])
    assert result.exit_code == 0
    assert all(r["cost_usd"] is None for r in read_output(setup["out"]))
    assert "cost n/a" in result.stderr


# --- input formats and bad input ----------------------------------------------------------


def test_json_list_and_openai_messages_with_ids(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    config = write_config(tmp_path / "moa.yaml", fake)
    source = tmp_path / "in.json"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": question(1)},
    ]
    source.write_text(json.dumps([{"id": "a", "messages": conversation}, {"instruction": "x"}]))
    out = tmp_path / "out.jsonl"
    assert batch(source, "-o", out, "-c", config).exit_code == 0
    assert sorted(str(r["id"]) for r in read_output(out)) == ["1", "a"]  # id, else position
    first = next(r for r in fake.requests if question(1) in r.text and r.model == "p1")
    assert first.messages[0]["content"].startswith("Be brief.")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"instruction": "a"}\n{"prompt": "b"}\n', "line 2: no 'instruction', 'turns' or"),
        ('{"id": 1, "instruction": "a"}\n{"id": 1, "instruction": "b"}\n', "line 2: id 1 is"),
        ('{"instruction": "a"}\nnot json\n', "line 2: not valid JSON"),
        ('[{"turns": []}]', "row 1: 'turns' must be a non-empty list"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}\n', "the last message must be"),
        ('{"instruction": "a", "turns": ["b"]}\n', "keep one of them"),
        ("", "no rows"),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_the_output_alone(
    tmp_path: Path, fake: FakeOpenAIServer, content: str, expected: str
) -> None:
    config = write_config(tmp_path / "moa.yaml", fake)
    source = tmp_path / "bad.jsonl"
    source.write_text(content)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": 0, "ok": true, "output": "kept"}\n')
    result = batch(source, "-o", out, "-c", config)
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {source}") and expected in line
    assert out.read_bytes() == b'{"id": 0, "ok": true, "output": "kept"}\n'
    assert fake.requests == []


def test_a_missing_input_file_is_a_usage_error(tmp_path: Path, setup: dict[str, Path]) -> None:
    result = batch(tmp_path / "nope.jsonl", "-o", setup["out"], "-c", setup["config"])
    assert result.exit_code == 2
    assert "nope.jsonl: no such file" in result.stderr
    assert not setup["out"].exists()


def test_output_must_not_be_the_input(setup: dict[str, Path]) -> None:
    result = batch(setup["input"], "-o", setup["input"], "-c", setup["config"])
    assert result.exit_code == 2
    assert "same file" in result.stderr


def test_plain_progress_lines_when_not_a_terminal(setup: dict[str, Path]) -> None:
    result = batch(setup["input"], "-o", setup["out"], "-c", setup["config"])
    assert "batch: 6 rows to run of 6" in result.stderr
    assert "batch: done in" in result.stderr and "6/6 rows, 0 failed" in result.stderr
    again = batch(setup["input"], "-o", setup["out"], "-c", setup["config"])
    assert again.exit_code == 0
    assert "all 6 rows are already finished" in again.stderr


def test_finished_rows_of_another_pipeline_are_never_relabelled(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    """A rerun with another pipeline on a finished OUT: refused, naming the flag that keeps the
    old rows; with it, they are exported under their own generator, not the new one."""
    fake.respond("agg", lambda body, n: Reply(text="first pipeline's answer"))
    fake.respond("best", lambda body, n: Reply(text="best pipeline's answer"))
    first = write_config(tmp_path / "moa.yaml", fake)
    second = tmp_path / "pipelines.yaml"
    second.write_text(
        json.dumps(
            {
                "providers": {"fake": {"base_url": fake.base_url}},
                "pipelines": {"best": {"aggregator": {"model": "best"}, "layers": 1}},
            }
        )
    )
    source = write_rows(tmp_path / "rows.json", instructions(3))
    out = tmp_path / "a.jsonl"
    assert batch(source, "-o", out, "-c", first, "--format", "alpaca_eval").exit_code == 0
    calls = len(fake.requests)
    rerun: list[str | Path] = [
        *(source, "-o", out, "-c", second, "--pipeline", "best", "--format", "alpaca_eval")
    ]
    refused = batch(*rerun)
    assert refused.exit_code == 2 and len(fake.requests) == calls
    assert "3 finished rows" in refused.stderr and "--keep-other-pipelines" in refused.stderr
    exported = json.loads(out.with_name("a.alpaca_eval.json").read_text())
    assert {item["generator"] for item in exported} == {"moa"}  # untouched by the refusal

    kept = batch(*rerun, "--keep-other-pipelines")
    assert kept.exit_code == 0, kept.stderr
    assert "kept" in kept.stderr and len(fake.requests) == calls
    exported = json.loads(out.with_name("a.alpaca_eval.json").read_text())
    assert [item["generator"] for item in exported] == ["moa"] * 3
    assert {item["output"] for item in exported} == {"first pipeline's answer"}

    # The same pipeline under a new --generator name relabels its own rows, as before.
    renamed = batch(source, "-o", out, "-c", first, "--format", "alpaca_eval", "--generator", "v2")
    assert renamed.exit_code == 0, renamed.stderr
    exported = json.loads(out.with_name("a.alpaca_eval.json").read_text())
    assert [item["generator"] for item in exported] == ["v2"] * 3


# --- the environment ----------------------------------------------------------------------


def test_a_finished_batch_exports_without_reading_its_env_file(setup: dict[str, Path]) -> None:
    """The .env file is read only once rows are pending: a rerun that only exports still works
    after the file is gone; with a row pending, its absence is the one error."""
    env_file = setup["out"].with_name("keys.env")
    env_file.write_text("UNUSED_KEY=x\n")
    common: list[str | Path] = [
        setup["input"],
        "-o",
        setup["out"],
        "-c",
        setup["config"],
        "--env-file",
        env_file,
    ]
    assert batch(*common).exit_code == 0
    env_file.unlink()
    rerun = batch(*common, "--format", "alpaca_eval")
    assert rerun.exit_code == 0, rerun.stderr
    assert "all 6 rows are already finished" in rerun.stderr
    exported = json.loads(setup["out"].with_name("out.alpaca_eval.json").read_text())
    assert len(exported) == 6
    write_rows(setup["input"], instructions(7))
    pending = batch(*common)
    assert pending.exit_code != 0
    assert "no such .env file" in pending.stderr


class _EnvEchoConfig(ProviderConfig):
    type: Literal["env-echo"] = "env-echo"


def test_an_in_process_batch_gives_providers_the_full_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider type added by register_provider_type may read any variable, not only the
    keys the config names: the worker in the CLI's own process sees the whole environment."""
    monkeypatch.setattr(registry, "_TYPES", dict(registry._TYPES))
    monkeypatch.setenv("ENV_ECHO_GREETING", "hello from the environment")

    def build(name: str, config: _EnvEchoConfig, env: Environment) -> ScriptedProvider:
        return ScriptedProvider(name, default=Answer(env.get("ENV_ECHO_GREETING") or "none"))

    register_provider_type(_EnvEchoConfig, build)
    config = tmp_path / "moa.yaml"
    config.write_text(
        json.dumps(
            {
                "providers": {"toy": {"type": "env-echo"}},
                "aggregator": {"model": "agg"},
                "layers": 1,
            }
        )
    )
    out = tmp_path / "out.jsonl"
    result = batch(write_rows(tmp_path / "in.jsonl", instructions(1)), "-o", out, "-c", config)
    assert result.exit_code == 0, result.stderr
    assert [r["output"] for r in read_output(out)] == ["hello from the environment"]
