"""`moa eval match`: short answers scored against the reference answers of their rows."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from moa.cli import cli
from moa.evaluation.accuracy import mcnemar_exact
from moa.evaluation.scoring import answer_number, is_correct, normalize

DATA = Path(__file__).parent.parent / "benchmarks" / "data" / "quality.jsonl"


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["eval", "match", *map(str, args)], catch_exceptions=False)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def record(row_id: str, output: str, row: dict[str, Any], *, ok: bool = True) -> dict[str, Any]:
    """A line as `moa batch` writes it (the fields eval match reads)."""
    return {
        "id": row_id,
        "ok": ok,
        "output": output if ok else "",
        "error": None if ok else "layer 1: every agent failed",
        "generator": "sys",
        "usage": {"prompt_tokens": 30, "completion_tokens": 10, "total_tokens": 40},
        "latency_s": 0.5,
        "runs": [
            {
                "layers": [[{"status": "ok"}, {"status": "ok"}]],
                "aggregator": {"usage": {"total_tokens": 12}},
            }
        ],
        "row": {"id": row_id, **row},
    }


ROWS: dict[str, dict[str, Any]] = {
    "q1": {"instruction": "What is 7 + 5?", "answers": ["12"], "category": "arithmetic"},
    "q2": {"instruction": "What is the capital of France?", "answer": "Paris", "category": "geo"},
    "q3": {"instruction": "How many minutes are in 2 hours?", "answers": [120], "category": "u"},
    "q4": {"instruction": "What do bees make?", "answers": ["honey"], "category": "geo"},
}


# --- scoring rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "accepted", "question", "expected"),
    [
        ("7 + 5 = 12", ["12"], "What is 7 + 5?", True),  # the question's numbers are skipped
        ("7 + 5 = 13", ["12"], "What is 7 + 5?", False),
        ("There are 120 minutes in 2 hours.", ["120"], "How many minutes are in 2 hours?", True),
        ("3 minutes is 3 * 60 = 180 seconds.", ["180"], "How many seconds in 3 minutes?", True),
        ("1 hour = 3600 seconds.", ["3600"], "How many seconds are in an hour?", True),
        ("A spider has eight legs.", ["8"], "How many legs does a spider have?", True),
        ("January has thirty-one days.", ["31"], "", True),
        ("It is 1,000 meters.", ["1000"], "", True),
        ("The answer is 9.", ["9"], "What is 72 divided by 9?", True),  # only the question's: last
        ("Its capital is Paris.", ["Paris"], "", True),
        ("A Parisian city.", ["Paris"], "", False),  # whole words only
        ("BRASÍLIA!", ["Brasilia"], "", True),  # case and accents folded
        ("The blue whale", ["blue whale"], "", True),
        ("A whale that is blue", ["blue whale"], "", False),
        ("nothing useful", ["12"], "", False),
    ],
)
def test_auto_match(output: str, accepted: list[str], question: str, expected: bool) -> None:
    assert is_correct(output, accepted, "auto", question) is expected


def test_each_mode_has_its_own_rule() -> None:
    assert is_correct("Paris.", ["paris"], "exact")
    assert not is_correct("It is Paris.", ["Paris"], "exact")
    assert is_correct("It is Paris.", ["Paris"], "contains")
    # contains reads digits as words: "5" is in "7 + 5 = 12", which numeric does not accept.
    assert is_correct("7 + 5 = 12", ["5"], "contains")
    assert not is_correct("7 + 5 = 12", ["5"], "numeric", "What is 7 + 5?")
    assert not is_correct("twelve", ["Paris"], "numeric")  # not a number: never numeric-right


def test_normalisation_and_numbers() -> None:
    assert normalize("The U.S. capital, 1,000.5 km!") == "u s capital 1000.5 km"
    assert answer_number("no number here") is None
    assert answer_number("1.5 km is 1500 m", "How many meters in 1.5 km?") == 1500


def test_mcnemar_exact_p_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(9, 1) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(5, 5) == 1.0


# --- the command ----------------------------------------------------------------------------


@pytest.fixture
def outputs(tmp_path: Path) -> tuple[Path, Path]:
    a = write_jsonl(
        tmp_path / "a.jsonl",
        [
            record("q1", "7 + 5 = 12", ROWS["q1"]),
            record("q2", "Lyon", ROWS["q2"]),
            record("q3", "120 minutes", ROWS["q3"]),
            record("q4", "", ROWS["q4"], ok=False),
        ],
    )
    b = write_jsonl(
        tmp_path / "b.jsonl",
        [
            record("q1", "12", ROWS["q1"]),
            record("q2", "Paris, of course.", ROWS["q2"]),
            record("q3", "2 hours", ROWS["q3"]),
            record("q4", "Bees make honey.", ROWS["q4"]),
        ],
    )
    return a, b


def test_accuracy_per_category_with_standard_error(
    outputs: tuple[Path, Path], tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    result = run(outputs[0], "--output-json", report)
    assert result.exit_code == 0, result.output
    assert "| **overall** | 50.0 | 25.0 | 2 | 4 |" in result.output
    assert "| arithmetic | 100.0 | 0.0 | 1 | 1 |" in result.output
    assert "Rows whose run failed (scored wrong): 1." in result.output
    data = json.loads(report.read_text())
    system = data["systems"][0]
    assert system["overall"] == {"accuracy": 0.5, "standard_error": 0.25, "correct": 2, "n": 4}
    assert system["categories"]["geo"]["n"] == 2
    assert system["per_row"] == {"calls": 3.0, "tokens": 40.0, "seconds": 0.5}
    assert [r["correct"] for r in system["rows"]] == [True, False, True, False]


def test_paired_comparison_lists_flips_and_tests_them(
    outputs: tuple[Path, Path], tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    result = run(*outputs, "--name-a", "alone", "--name-b", "moa", "--output-json", report)
    assert result.exit_code == 0, result.output
    paired = json.loads(report.read_text())["paired"]
    # q1 both right; q2 and q4 right in B only; q3 right in A only.
    assert paired["both_right"] == 1 and paired["neither_right"] == 0
    assert paired["a_only"] == ["q3"] and paired["b_only"] == ["q2", "q4"]
    assert paired["difference"] == 0.25
    diffs = [0, 1, -1, 1]
    mean = sum(diffs) / 4
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3) / 2
    assert paired["standard_error"] == round(se, 4)
    assert paired["p_value"] == pytest.approx(1.0)  # 2 vs 1 flips: no evidence either way
    assert "moa minus alone = +25.0" in result.output
    assert "| q3 | alone | How many minutes are in 2 hours? | 120 |" in result.output


def test_reference_rows_supply_the_answers(tmp_path: Path) -> None:
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"id": k, **v} for k, v in ROWS.items()])
    bare = write_jsonl(
        tmp_path / "out.jsonl",
        [{"id": "q1", "ok": True, "output": "12"}, {"id": "q2", "ok": True, "output": "Rome"}],
    )
    result = run(bare, "--reference", rows)
    assert result.exit_code == 0, result.output
    assert "| **overall** | 50.0 |" in result.output
    assert "Reference rows without a record in the output: 2." in result.output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json\n", "line 1: not valid JSON"),
        ('{"id": "1", "ok": true, "output": "x", "row": {"instruction": "q"}}\n', "no reference"),
        (
            '{"id": "1", "ok": true, "output": "x", "row": {"instruction": "q", "answers": []}}\n',
            "`answers` must be a non-empty string or a list",
        ),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "answers.jsonl"
    if content is not None:
        path.write_text(content)
    result = run(path)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in result.output


def test_outputs_with_no_row_in_common_are_refused(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [record("q1", "12", ROWS["q1"])])
    b = write_jsonl(tmp_path / "b.jsonl", [record("q2", "Paris", ROWS["q2"])])
    result = run(a, b)
    assert result.exit_code == 2
    assert "no row id in common" in result.output


def test_the_shipped_dataset_is_well_formed() -> None:
    """The quality benchmark's own questions: enough of them, every family, answers that the
    question does not give away (a contains-match would otherwise be free)."""
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 150
    assert len({r["id"] for r in rows}) == len(rows)
    categories = {r["category"] for r in rows}
    assert {"arithmetic", "geography", "science", "units", "dates", "reasoning"} <= categories
    for row in rows:
        assert row["answers"] and all(isinstance(a, str) and a for a in row["answers"])
        for answer in row["answers"]:
            if not answer.isdigit():
                assert not is_correct(row["instruction"], [answer], "contains"), row


def test_match_draws_accuracy_per_category_with_error_bars(tmp_path: Path) -> None:
    a = write_jsonl(
        tmp_path / "a.jsonl",
        [
            record(k, out, ROWS[k])
            for k, out in zip(ROWS, ["12", "Paris", "120", "wax"], strict=True)
        ],
    )
    b = write_jsonl(
        tmp_path / "b.jsonl",
        [
            record(k, out, ROWS[k])
            for k, out in zip(ROWS, ["13", "Paris", "60", "honey"], strict=True)
        ],
    )
    plot = tmp_path / "accuracy.png"
    result = run(a, b, "--plot", plot)
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:4] == b"\x89PNG" and plot.stat().st_size > 5_000


def test_match_refuses_an_unknown_plot_format_before_reading(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["eval", "match", str(tmp_path / "missing.jsonl"), "--plot", str(tmp_path / "x.gif")]
    )
    assert result.exit_code == 2 and "unknown image format .gif" in result.output
