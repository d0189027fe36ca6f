"""`moa batch` against bad rows and a failing file system: one line, the right exit code, and
no row lost or written twice."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from moa.batch.export import export
from moa.batch.rows import load_rows
from moa.batch.store import OutputStore
from moa.errors import OutputError
from moa.testing import FakeOpenAIServer
from tests.test_batch import batch, instructions, question, read_output, write_config, write_rows

EXIT_RUN_FAILED = 1


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def only_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_a_row_with_a_lone_surrogate_runs_with_a_note_and_never_stops_the_batch(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    config = write_config(tmp_path / "moa.yaml", fake)
    source = tmp_path / "in.jsonl"
    # As scraped data has it: a JSON escape of half an emoji, in the text and in the id.
    source.write_text(
        json.dumps({"id": 0, "instruction": question(0)})
        + "\n"
        + '{"id": 1, "instruction": "a \\ud83d b", "input": "\\udc00"}\n'
        + '{"id": "x\\ud83d", "instruction": "c"}\n'
        + json.dumps({"id": 3, "instruction": question(3)})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    result = batch(source, "-o", out, "-c", config, "--no-cache")
    assert result.exit_code == 0, result.stderr
    records = {str(r["id"]): r for r in read_output(out)}
    assert set(records) == {"0", "1", "x\ufffd", "3"}
    assert all(r["ok"] for r in records.values())
    assert records["1"]["row"]["instruction"] == "a \ufffd b"
    assert "2 character(s)" in records["1"]["notes"][0]
    assert "notes" not in records["0"]
    assert any("a \ufffd b" in r.text for r in fake.requests)
    # Resuming sees every row as finished: nothing stops at the bad row any more.
    again = batch(source, "-o", out, "-c", config, "--no-cache")
    assert again.exit_code == 0 and "all 4 rows are already finished" in again.stderr


def test_an_output_whose_directory_cannot_be_made_is_one_line_exit_1(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    config = write_config(tmp_path / "moa.yaml", fake)
    source = write_rows(tmp_path / "in.jsonl", instructions(2))
    (tmp_path / "a-file").write_text("not a directory")
    result = batch(source, "-o", tmp_path / "a-file" / "sub" / "out.jsonl", "-c", config)
    assert result.exit_code == EXIT_RUN_FAILED  # the output failed; the usage was fine
    assert "cannot use it as the output file" in only_error_line(result.stderr)
    assert fake.requests == []


def test_a_leftover_that_cannot_be_removed_is_one_line_exit_1(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    config = write_config(tmp_path / "moa.yaml", fake)
    source = write_rows(tmp_path / "in.jsonl", instructions(2))
    out = tmp_path / "out.jsonl"
    (tmp_path / ".out.jsonl.compacting").mkdir()  # unlink() fails: not "file not found"
    result = batch(source, "-o", out, "-c", config)
    assert result.exit_code == EXIT_RUN_FAILED
    assert "cannot use it as the output file" in only_error_line(result.stderr)


def test_an_export_that_cannot_be_written_is_refused_before_the_run(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    config = write_config(tmp_path / "moa.yaml", fake)
    source = write_rows(tmp_path / "in.jsonl", instructions(2))
    (tmp_path / "a-file").write_text("")
    result = batch(
        source,
        "-o",
        tmp_path / "out.jsonl",
        "-c",
        config,
        "--format",
        "alpaca_eval",
        "--export",
        tmp_path / "a-file" / "x.json",
    )
    assert result.exit_code == EXIT_RUN_FAILED
    assert "cannot write the export there" in only_error_line(result.stderr)
    assert fake.requests == []


def test_an_output_held_by_another_batch_is_one_line_exit_1_and_loses_nothing(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    config = write_config(tmp_path / "moa.yaml", fake)
    source = write_rows(tmp_path / "in.jsonl", instructions(2))
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": 0, "ok": False, "error": "HTTP 500"}) + "\n")
    before = out.read_bytes()
    store = OutputStore.open(out)  # a batch writing this output holds its lock
    try:
        result = batch(source, "-o", out, "-c", config, "--no-cache")
    finally:
        asyncio.run(store.aclose())
    assert result.exit_code == EXIT_RUN_FAILED
    assert "another `moa batch` is writing this file" in only_error_line(result.stderr)
    assert fake.requests == [] and out.read_bytes() == before
    # Once the other one is done, the same command retries row 0 and runs row 1.
    assert batch(source, "-o", out, "-c", config, "--no-cache").exit_code == 0
    assert sorted((r["id"], r["ok"]) for r in read_output(out)) == [(0, True), (1, True)]


def test_an_output_that_is_a_directory_is_an_output_error(tmp_path: Path) -> None:
    (tmp_path / "out.jsonl").mkdir()
    with pytest.raises(OutputError, match="cannot use it as the output file") as caught:
        OutputStore.open(tmp_path / "out.jsonl")
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_an_export_failing_after_the_run_is_an_output_error(tmp_path: Path) -> None:
    source = write_rows(tmp_path / "in.jsonl", instructions(1))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OutputError, match="the answers are kept in the output file"):
        export(
            "alpaca_eval",
            tmp_path / "a-file" / "x.json",
            load_rows(source),
            {json.dumps(0): {"ok": True, "output": "o"}},
            generator="g",
        )


def _limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_full_disk_mid_run_is_exit_1_and_a_rerun_resumes_without_duplicates(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    config = write_config(tmp_path / "moa.yaml", fake)
    source = write_rows(tmp_path / "in.jsonl", instructions(12))
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "moa", "batch", str(source), "-o", str(out)]
    command += ["-c", str(config), "--no-cache", "-j", "2"]
    # The output may not grow past ~3 records: every later write fails as on a full disk.
    full = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: _limit_file_size(9000),
    )
    assert full.returncode == EXIT_RUN_FAILED, full.stderr
    line = only_error_line(full.stderr)
    assert "cannot write the output" in line and "rerun the same command to resume" in line
    saved = out.read_bytes().count(b"\n")
    assert 0 < saved < 12
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    ids = [r["id"] for r in read_output(out) if r["ok"]]
    assert sorted(ids) == list(range(12))  # every row once, none twice


def test_a_compaction_that_fails_leaves_the_output_intact_and_no_temporary_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out.jsonl"

    async def write_then_close() -> None:
        store = OutputStore.open(out)
        await store.append({"id": 1, "ok": False, "error": "HTTP 500"})
        await store.append({"id": 1, "ok": True, "output": "fine"})
        before = out.read_bytes()
        os.mkdir(tmp_path / ".out.jsonl.compacting")  # the rewrite's file cannot be created
        await store.aclose()
        assert out.read_bytes() == before

    with caplog.at_level(logging.WARNING, logger="moa.batch"):
        asyncio.run(write_then_close())
    assert "could not drop 1 superseded failure record" in caplog.text
    os.rmdir(tmp_path / ".out.jsonl.compacting")

    # The next open compacts: each id once.
    async def reopen() -> None:
        store = OutputStore.open(out)
        assert store.finished == {"1"}
        await store.aclose()

    asyncio.run(reopen())
    assert [json.loads(line)["ok"] for line in out.read_text().splitlines()] == [True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_a_compaction_that_fails_midway_removes_its_temporary_file(tmp_path: Path) -> None:
    """A rewrite cut short by the disk filling (here: the file-size limit) leaves nothing."""
    out = tmp_path / "out.jsonl"
    script = f"""
import asyncio, resource, signal
from pathlib import Path
from moa.batch.store import OutputStore

async def main():
    store = OutputStore.open(Path({str(out)!r}))
    for n in range(40):
        await store.append({{"id": n, "ok": False, "error": "x" * 200}})
    for n in range(40):
        await store.append({{"id": n, "ok": True, "output": "y" * 200}})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))
    await store.aclose()

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "could not drop 40 superseded failure record(s) (File too large)" in done.stderr
    assert not (tmp_path / ".out.jsonl.compacting").exists()
    assert out.read_bytes().count(b"\n") == 80  # untouched
