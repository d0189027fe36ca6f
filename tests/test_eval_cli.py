"""`moa eval` end to end: the fake server is the judge, reached over real HTTP."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from moa.cli import cli
from moa.testing import FakeOpenAIServer, Reply

JUDGE = "judge"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's own call cache, whatever a test forgets to pass."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture
def judge_config(fake: FakeOpenAIServer, tmp_path: Path) -> Path:
    path = tmp_path / "judge.yaml"
    path.write_text(f'providers:\n  fake: {{base_url: "{fake.base_url}"}}\n')
    return path


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["eval", *map(str, args)], catch_exceptions=False)


def judge_args(config: Path, cache: Path | None = None) -> list[str | Path]:
    return [
        "--judge",
        f"fake/{JUDGE}",
        "--config",
        config,
        *(["--cache", cache] if cache is not None else ["--no-cache"]),
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def user_text(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


def block(text: str, label: str) -> str:
    """The content of one fenced block of a judge prompt."""
    match = re.search(rf"<<<{label} (\w+)>>>\n(.*?)\n<<<end of {label} \1>>>", text, re.DOTALL)
    assert match is not None, f"no {label} block in {text!r}"
    return match.group(2)


def quality_judge(body: dict[str, Any], n: int) -> Reply:
    """Prefers the response containing GOOD, calls it even when both or neither do."""
    text = user_text(body)
    first, second = "GOOD" in block(text, "Response A"), "GOOD" in block(text, "Response B")
    verdict = "TIE" if first == second else ("A" if first else "B")
    return Reply(text=f"Having compared both carefully.\n[[{verdict}]]")


@pytest.fixture
def systems(tmp_path: Path) -> tuple[Path, Path]:
    """A: a `moa batch` file; B: AlpacaEval outputs. A is better on 3 of 4 shared prompts."""
    a = write_jsonl(
        tmp_path / "moa-batch.jsonl",
        [
            {"id": "1", "ok": True, "output": "GOOD one", "prompt": "P1"},
            {"id": "2", "ok": True, "output": "GOOD two", "prompt": "P2"},
            {"id": "3", "ok": True, "output": "GOOD three", "prompt": "P3"},
            {"id": "4", "ok": True, "output": "plain four", "prompt": "P4"},
            {"id": "5", "ok": False, "output": "", "error": "upstream 500", "prompt": "P5"},
            {"id": "6", "ok": True, "output": "only in A", "prompt": "P6"},
        ],
    )
    b = tmp_path / "baseline.json"
    b.write_text(
        json.dumps(
            [
                {"instruction": f"P{n}", "output": out, "generator": "baseline-7b"}
                for n, out in [(1, "meh"), (2, "meh"), (3, "meh"), (4, "GOOD four"), (5, "x")]
            ]
        )
    )
    return a, b


def test_pairwise_reports_win_rate_table_and_json(
    fake: FakeOpenAIServer, judge_config: Path, systems: tuple[Path, Path], tmp_path: Path
) -> None:
    fake.respond(JUDGE, quality_judge)
    out = tmp_path / "report.json"
    result = run("pairwise", *systems, *judge_args(judge_config), "--output-json", out)
    assert result.exit_code == 0, result.output
    assert len(fake.requests) == 8  # 4 shared prompts, both orders
    assert all(r.model == JUDGE and r.body["temperature"] == 0 for r in fake.requests)
    assert "| moa-batch over baseline-7b | 75.0 | 25.0 | 3 | 0 | 1 | 4 |" in result.stdout
    data = json.loads(out.read_text())
    assert data["summary"]["win_rate"] == 0.75
    assert data["summary"]["standard_error"] == 0.25  # scores 1,1,1,0: sd 0.5 / sqrt(4)
    assert data["matched_by"] == "instruction"
    assert data["a"]["skipped"] == {"failed in the batch (ok: false)": 1}
    assert (data["a"]["unmatched"], data["b"]["unmatched"]) == (1, 1)
    first = data["items"][0]
    assert first["key"] == "P1" and first["score"] == 1.0
    assert [j["shown_first"] for j in first["judgments"]] == ["A", "B"]
    assert [j["choice"] for j in first["judgments"]] == ["first", "second"]
    assert [j["winner"] for j in first["judgments"]] == ["A", "A"]
    assert "[[A]]" in first["judgments"][0]["judge_output"]
    # The report's keys are public (scripts read them): a field added to a dataclass that the
    # JSON is built from must not change them unnoticed.
    assert list(data) == ["kind", "judge", "a", "b", "matched_by", "summary", "items"]
    assert list(data["a"]) == list(data["b"]) == ["name", "path", "rows", "unmatched", "skipped"]
    assert list(data["summary"]) == [
        "win_rate",
        "standard_error",
        "items",
        "scored",
        "wins",
        "ties",
        "losses",
        "identical",
        "verdicts",
        "unparseable_verdicts",
        "failed_judge_calls",
        "incomplete_items",
        "consistent_items",
        "first_shown_rate",
        "prompt_mismatches",
        "turn_mismatches",
    ]
    assert list(first) == ["key", "score", "identical", "judgments"]
    judgment = ["shown_first", "choice", "winner", "problem", "failed", "judge_output"]
    assert all(list(j) == judgment for j in first["judgments"])


def test_pairwise_judge_with_position_bias_gives_exactly_half(
    fake: FakeOpenAIServer, judge_config: Path, systems: tuple[Path, Path], tmp_path: Path
) -> None:
    fake.script(JUDGE, *[Reply(text="The first one. [[A]]")] * 8)
    out = tmp_path / "r.json"
    result = run("pairwise", *systems, *judge_args(judge_config), "--output-json", out)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())["summary"]
    assert (summary["win_rate"], summary["ties"], summary["consistent_items"]) == (0.5, 4, 0)
    assert summary["first_shown_rate"] == 1.0


def test_pairwise_counts_unparseable_and_failed_verdicts(
    fake: FakeOpenAIServer, judge_config: Path, systems: tuple[Path, Path], tmp_path: Path
) -> None:
    def judge(body: dict[str, Any], n: int) -> Reply:
        text = user_text(body)
        if "P2" in block(text, "user's request"):
            return Reply(text="Both responses have merit; I decline to choose.")
        if "P3" in block(text, "user's request") and "GOOD" in block(text, "Response A"):
            return Reply(status=400)  # not retried: one failed call
        return quality_judge(body, n)

    fake.respond(JUDGE, judge)
    out = tmp_path / "r.json"
    result = run("pairwise", *systems, *judge_args(judge_config), "--output-json", out)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())["summary"]
    assert summary["unparseable_verdicts"] == 2
    assert summary["failed_judge_calls"] == 1
    assert summary["incomplete_items"] == 2
    assert (summary["scored"], summary["win_rate"]) == (2, 0.5)  # P1 won, P4 lost
    assert "| Unparseable verdicts | 2 |" in result.stdout
    assert "| Failed judge calls | 1 |" in result.stdout
    assert "warning: 1 judge call failed" in result.stderr


def test_pairwise_exits_1_when_nothing_can_be_scored(
    fake: FakeOpenAIServer, judge_config: Path, systems: tuple[Path, Path]
) -> None:
    fake.respond(JUDGE, lambda body, n: Reply(text="no opinion"))
    result = run("pairwise", *systems, *judge_args(judge_config))
    assert result.exit_code == 1
    assert "| Unparseable verdicts | 8 |" in result.stdout
    assert result.stderr.strip().endswith("8 verdicts unparseable)")


def test_identical_answers_tie_without_a_judge_call(
    fake: FakeOpenAIServer, judge_config: Path, tmp_path: Path
) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "output": "same", "prompt": "p"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": 1, "output": "same\n", "prompt": "p"}])
    result = run("pairwise", a, b, *judge_args(judge_config))
    assert result.exit_code == 0, result.output
    assert fake.requests == []
    assert "| a over b | 50.0 | n/a | 0 | 1 | 0 | 1 |" in result.stdout


def test_multi_turn_batch_rows_show_the_judge_the_conversation(
    fake: FakeOpenAIServer, judge_config: Path, tmp_path: Path
) -> None:
    conversation = [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "A bigger one?"},
    ]
    a = write_jsonl(
        tmp_path / "a.jsonl", [{"id": "c", "output": "GOOD 11", "messages": conversation}]
    )
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "c", "output": "8", "messages": conversation}])
    fake.respond(JUDGE, quality_judge)
    result = run("pairwise", a, b, *judge_args(judge_config), "--limit", "1")
    assert result.exit_code == 0, result.output
    shown = block(fake.requests[0].text, "conversation")
    assert "Name a prime." in shown and "Seven." in shown and "A bigger one?" in shown


@pytest.mark.parametrize(
    ("rows", "message"),
    [(None, "no such file"), ([{"id": 1, "ok": False}], "no usable rows")],
)
def test_unusable_input_is_one_error_line_and_exit_2(
    fake: FakeOpenAIServer,
    judge_config: Path,
    systems: tuple[Path, Path],
    tmp_path: Path,
    rows: list[dict[str, Any]] | None,
    message: str,
) -> None:
    bad = tmp_path / "bad.jsonl"
    if rows is not None:
        write_jsonl(bad, rows)
    result = run("pairwise", systems[0], bad, *judge_args(judge_config))
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {bad}: {message}")
    assert fake.requests == []


def test_choosing_the_judge_is_checked(judge_config: Path, systems: tuple[Path, Path]) -> None:
    none = run("pairwise", *systems, "--no-cache")
    assert none.exit_code == 2 and "exactly one of --judge" in none.stderr
    unknown = run("pairwise", *systems, "--judge", "nope/model", "--config", judge_config)
    assert unknown.exit_code == 2 and "PROVIDER one of fake" in unknown.stderr
    no_key = run("pairwise", *systems, "--judge", "openai/gpt-4.1", "--no-cache")
    assert no_key.exit_code == 2 and "OPENAI_API_KEY" in no_key.stderr
    both = run("pairwise", *systems, "--judge-preset", "openai", "-c", judge_config)
    assert both.exit_code == 2 and "--judge-preset takes no --config" in both.stderr
    missing = judge_config.parent / "missing.env"
    no_env = run("pairwise", *systems, *judge_args(judge_config), "--env-file", missing)
    assert no_env.exit_code == 2 and no_env.stderr == f"error: {missing}: no such .env file\n"


def test_a_config_with_one_provider_needs_only_the_model(
    fake: FakeOpenAIServer, judge_config: Path, systems: tuple[Path, Path]
) -> None:
    fake.respond(JUDGE, quality_judge)
    result = run("pairwise", *systems, "--judge", JUDGE, "-c", judge_config, "--no-cache")
    assert result.exit_code == 0, result.output
    assert "Judge: fake/judge." in result.stdout
    assert {r.model for r in fake.requests} == {JUDGE}


def test_files_without_a_common_item_are_a_usage_error(
    fake: FakeOpenAIServer, judge_config: Path, tmp_path: Path
) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "output": "x", "prompt": "p"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": 2, "output": "y", "prompt": "p"}])
    result = run("pairwise", a, b, *judge_args(judge_config))
    assert result.exit_code == 2
    assert "no item in common (matched by id)" in result.stderr
    assert fake.requests == []


# --- MT-Bench -------------------------------------------------------------------------------


def grading_judge(body: dict[str, Any], n: int) -> Reply:
    """Grades the named reply with the number it carries as 'score=N', or says nothing useful."""
    text = user_text(body)
    turn = max(int(t) for t in re.findall(r"<<<assistant's reply (\d+) ", text))
    match = re.search(r"score=(\d+)", block(text, f"assistant's reply {turn}"))
    return Reply(text=f"Fair.\nRating: [[{match.group(1)}]]" if match else "Hard to say.")


@pytest.fixture
def bench(tmp_path: Path) -> tuple[Path, Path]:
    questions = write_jsonl(
        tmp_path / "question.jsonl",
        [
            {
                "question_id": 81,
                "category": "writing",
                "turns": ["Write a haiku.", "Now a limerick."],
            },
            {"question_id": 82, "category": "writing", "turns": ["Write a toast.", "Shorter."]},
            {
                "question_id": 111,
                "category": "math",
                "turns": ["What is 2+2?", "And times 3?"],
                "reference": ["4", "12"],
            },
        ],
    )
    answers = write_jsonl(
        tmp_path / "model_answer.jsonl",
        [
            {
                "question_id": 81,
                "model_id": "moa",
                "choices": [{"index": 0, "turns": ["score=8", "score=6"]}],
            },
            {
                "question_id": 82,
                "model_id": "moa",
                "choices": [{"index": 0, "turns": ["score=10", "garbled"]}],
            },
            {
                "question_id": 111,
                "model_id": "moa",
                "choices": [{"index": 0, "turns": ["score=9", "score=3"]}],
            },
        ],
    )
    return questions, answers


def test_mt_bench_grades_every_turn_and_averages_per_category(
    fake: FakeOpenAIServer, judge_config: Path, bench: tuple[Path, Path], tmp_path: Path
) -> None:
    questions, answers = bench
    fake.respond(JUDGE, grading_judge)
    out = tmp_path / "mt.json"
    result = run(
        "mt-bench",
        answers,
        "--questions",
        questions,
        *judge_args(judge_config),
        "--output-json",
        out,
    )
    assert result.exit_code == 0, result.output
    assert len(fake.requests) == 6
    # Grading turn 2 shows the whole exchange, and the references for the math question.
    turn_two = next(r.text for r in fake.requests if "score=3" in r.text)
    for text in ("What is 2+2?", "score=9", "And times 3?", "score=3"):
        assert text in turn_two
    assert "<<<reference answer to message 2" in turn_two and "12" in turn_two
    assert "| math | 9.00 | 3.00 | 6.00 | 2 |" in result.stdout
    assert "| writing | 9.00 | 6.00 | 8.00 | 3 |" in result.stdout
    assert "| **overall** | 9.00 | 4.50 | 7.20 | 5 |" in result.stdout
    assert "Unparseable grades: 1." in result.stdout
    data = json.loads(out.read_text())
    # The report's keys are public (see the pairwise test): pinned, grades' included.
    assert list(data) == [
        "kind",
        "judge",
        "answers",
        "questions",
        "question_count",
        "unknown_questions",
        "duplicate_answers",
        "skipped_answers",
        "models",
        "grades",
    ]
    grade = ["model", "question_id", "category", "turn", "score", "problem", "failed"]
    assert data["grades"] and all(list(g) == [*grade, "judge_output"] for g in data["grades"])
    model = data["models"][0]
    assert list(model) == [
        "model",
        "overall",
        "categories",
        "unparseable_grades",
        "failed_judge_calls",
        "unanswered_questions",
        "missing_turns",
    ]
    assert list(model["overall"]) == ["turns", "mean", "graded"]
    assert model["model"] == "moa"
    assert model["overall"]["mean"] == 7.2
    assert model["categories"]["writing"]["turns"] == [{"mean": 9.0, "n": 2}, {"mean": 6.0, "n": 1}]
    assert model["unparseable_grades"] == 1


def test_mt_bench_limit_grades_only_the_first_questions(
    fake: FakeOpenAIServer, judge_config: Path, bench: tuple[Path, Path]
) -> None:
    questions, answers = bench
    fake.respond(JUDGE, grading_judge)
    result = run("mt-bench", answers, "-q", questions, *judge_args(judge_config), "--limit", "1")
    assert result.exit_code == 0, result.output
    assert len(fake.requests) == 2
    assert "not in the questions file" not in result.stdout


# --- the cache ------------------------------------------------------------------------------


def test_rerunning_an_eval_makes_no_calls(
    fake: FakeOpenAIServer,
    judge_config: Path,
    systems: tuple[Path, Path],
    bench: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    cache = tmp_path / "calls.sqlite3"
    fake.respond(
        JUDGE,
        lambda body, n: (
            quality_judge(body, n) if "Response A" in user_text(body) else grading_judge(body, n)
        ),
    )
    pair = ["pairwise", *systems, *judge_args(judge_config, cache)]
    bench_args = ["mt-bench", bench[1], "-q", bench[0], *judge_args(judge_config, cache)]
    first = [run(*pair), run(*bench_args)]
    calls = len(fake.requests)
    assert calls == 8 + 6
    second = [run(*pair), run(*bench_args)]
    assert len(fake.requests) == calls  # every judge call answered from the cache
    assert [r.stdout for r in second] == [r.stdout for r in first]
    # The one unparseable grade's reply was a real answer, so it was cached too; --no-cache
    # asks the judge again.
    run("pairwise", *systems, *judge_args(judge_config))
    assert len(fake.requests) == calls + 8


def test_a_moa_pipeline_can_judge(
    fake: FakeOpenAIServer, systems: tuple[Path, Path], tmp_path: Path
) -> None:
    config = tmp_path / "moa.yaml"
    config.write_text(
        f"""
providers:
  fake: {{base_url: "{fake.base_url}"}}
pipelines:
  jury:
    proposers: [{{model: juror1}}, {{model: juror2}}]
    aggregator: {{model: foreman}}
    layers: 2
"""
    )
    fake.respond("foreman", quality_judge)
    cache = tmp_path / "c.sqlite3"
    args: list[str | Path] = [
        "pairwise",
        *systems,
        "--judge-pipeline",
        "jury",
        "-c",
        config,
        "--cache",
        cache,
        "--judge-max-tokens",
        "300",
    ]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "Judge: MoA pipeline jury." in result.stdout
    assert "| 75.0 |" in result.stdout
    assert len(fake.requests_for("foreman")) == 8
    assert len(fake.requests_for("juror1")) == 8
    # The judge's temperature 0 and token cap reach the agent that writes its verdict; the
    # jurors keep their configured sampling.
    foreman = {(r.body["temperature"], r.body["max_tokens"]) for r in fake.requests_for("foreman")}
    assert foreman == {(0.0, 300)}
    assert {r.body["temperature"] for r in fake.requests_for("juror1")} == {0.7}
    calls = len(fake.requests)
    assert run(*args).stdout == result.stdout
    assert len(fake.requests) == calls


def test_the_installed_command_runs_the_eval(
    fake: FakeOpenAIServer, judge_config: Path, systems: tuple[Path, Path], tmp_path: Path
) -> None:
    fake.respond(JUDGE, quality_judge)
    done = subprocess.run(
        [sys.executable, "-m", "moa", "eval", "pairwise", *map(str, systems)]
        + [str(a) for a in judge_args(judge_config, tmp_path / "c.sqlite3")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "| moa-batch over baseline-7b | 75.0 |" in done.stdout


def test_batch_outputs_and_exports_feed_the_evals(
    fake: FakeOpenAIServer, judge_config: Path, tmp_path: Path
) -> None:
    """`moa batch` twice (a strong and a weak pipeline), then both evals on what it wrote."""
    config = tmp_path / "moa.yaml"
    config.write_text(
        f"""
providers:
  fake: {{base_url: "{fake.base_url}"}}
pipelines:
  strong: {{aggregator: {{model: strong}}, layers: 1}}
  weak: {{aggregator: {{model: weak}}, layers: 1}}
"""
    )
    questions = write_jsonl(
        tmp_path / "question.jsonl",
        [
            {"question_id": 1, "category": "writing", "turns": ["Write a haiku.", "Now shorter."]},
            {"question_id": 2, "category": "math", "turns": ["2+2?", "Times 3?"]},
        ],
    )
    fake.respond("strong", lambda body, n: Reply(text=f"GOOD score=9 #{len(body['messages'])}"))
    fake.respond("weak", lambda body, n: Reply(text=f"poor score=4 #{len(body['messages'])}"))
    cache = tmp_path / "calls.sqlite3"
    outputs = {}
    for name in ("strong", "weak"):
        outputs[name] = tmp_path / f"{name}.jsonl"
        batch = CliRunner().invoke(
            cli,
            [
                *("batch", str(questions), "-o", str(outputs[name]), "-c", str(config)),
                *("--pipeline", name, "--format", "mt_bench", "--cache", str(cache)),
            ],
            catch_exceptions=False,
        )
        assert batch.exit_code == 0, batch.output
    fake.respond(
        JUDGE,
        lambda body, n: (
            quality_judge(body, n) if "Response A" in user_text(body) else grading_judge(body, n)
        ),
    )
    calls = len(fake.requests)
    pair = run("pairwise", outputs["strong"], outputs["weak"], *judge_args(judge_config, cache))
    assert pair.exit_code == 0, pair.output
    assert "| strong over weak | 100.0 | 0.0 | 2 | 0 | 0 | 2 |" in pair.stdout
    # Two-turn rows: each response block holds that pipeline's own two answers.
    judged = fake.requests[calls].text
    assert "Now shorter." in judged or "Times 3?" in judged
    assert judged.count("GOOD score=9") == 2 and judged.count("poor score=4") == 2
    export = outputs["strong"].with_name("strong.mt_bench.jsonl")
    bench = run("mt-bench", export, "-q", questions, *judge_args(judge_config, cache))
    assert bench.exit_code == 0, bench.output
    assert "| **overall** | 9.00 | 9.00 | 9.00 | 4 |" in bench.stdout
    # `moa batch` output itself is read as well as the export (same ids, turns and model name).
    raw = run("mt-bench", outputs["strong"], "-q", questions, *judge_args(judge_config, cache))
    assert raw.exit_code == 0, raw.output
    assert raw.stdout == bench.stdout
    calls = len(fake.requests)
    assert (
        run("pairwise", outputs["strong"], outputs["weak"], *judge_args(judge_config, cache)).stdout
        == pair.stdout
    )
    assert (
        run("mt-bench", export, "-q", questions, *judge_args(judge_config, cache)).stdout
        == bench.stdout
    )
    assert len(fake.requests) == calls


def test_concurrency_caps_judge_calls_in_flight(
    fake: FakeOpenAIServer, judge_config: Path, systems: tuple[Path, Path]
) -> None:
    fake.respond(JUDGE, lambda body, n: Reply(text="[[TIE]]", latency=0.05))
    result = run("pairwise", *systems, *judge_args(judge_config), "--concurrency", "3")
    assert result.exit_code == 0, result.output
    assert len(fake.requests) == 8
    assert fake.max_in_flight == 3
