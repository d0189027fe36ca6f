"""The one reader and the one atomic write every face uses (`moa._files`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moa._files import alpaca_prompt, read_records, read_usable, record_id, write_atomically
from moa.errors import InputFileError


def test_a_json_list_and_json_lines_read_the_same_records(tmp_path: Path) -> None:
    records = [{"a": 1}, {"b": [2]}]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(records), encoding="utf-8-sig")  # a byte-order mark is fine
    lines = tmp_path / "lines.jsonl"
    lines.write_text(
        "\n".join(json.dumps(r) for r in records[:1]) + "\n\n" + json.dumps(records[1])
    )
    assert read_records(listed, "x") == [("row 1", records[0]), ("row 2", records[1])]
    assert read_records(lines, "x") == [("line 1", records[0]), ("line 3", records[1])]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "in.jsonl: no such file"),
        ('{"a": 1}\n{"a": \n', "in.jsonl line 2: not valid JSON"),
        ('[{"a": 1},', "in.jsonl: not valid JSON at line 1, column"),
        (b"\xff\xfe{", "in.jsonl: cannot read it"),
    ],
)
def test_an_unreadable_file_is_one_line_naming_it_and_what_was_expected(
    tmp_path: Path, content: str | bytes | None, expected: str
) -> None:
    path = tmp_path / "in.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(InputFileError) as caught:
        read_records(path, "rows with a question")
    message = str(caught.value)
    assert expected in message and "\n" not in message
    assert content is None or "rows with a question" in message or "cannot read" in message


def test_usable_records_are_kept_and_the_others_counted_by_reason(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"q": "a"}\n[]\n{"q": ""}\n{}\n')

    def parse(record: object) -> str | int:
        if not isinstance(record, dict):
            return "not a JSON object"
        return len(record["q"]) if record.get("q") else "no q"

    assert read_usable(path, "x", "rows", parse) == ([1], {"not a JSON object": 1, "no q": 2})
    path.write_text("[7]")
    with pytest.raises(InputFileError, match=r"no usable rows \(1 not a JSON object\); x"):
        read_usable(path, "x", "rows", parse)


def test_alpaca_input_follows_the_instruction_and_ids_are_strings_or_integers() -> None:
    assert alpaca_prompt({"instruction": "Sum:", "input": "1 2"}) == "Sum:\n\n1 2"
    assert alpaca_prompt({"instruction": "Sum:", "input": "  "}) == "Sum:"
    assert alpaca_prompt({"text": "Hi"}, "text") == "Hi"
    assert alpaca_prompt({"instruction": " "}) is None
    assert [record_id(v) for v in (7, "a", "", True, 1.5, None)] == [
        "7",
        "a",
        None,
        None,
        None,
        None,
    ]


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    write_atomically(path, "old")
    (tmp_path / ".report.json.writing").mkdir()  # the temporary file cannot be made
    with pytest.raises(IsADirectoryError):
        write_atomically(path, "new")
    assert path.read_text() == "old"
    (tmp_path / ".report.json.writing").rmdir()
    write_atomically(path, b"new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
