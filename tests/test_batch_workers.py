"""`moa batch --workers N`: worker processes on this machine, one writer, shared limits.

The same guarantees as a single-process batch: every row exactly once (even when a worker or
the whole batch is killed), provider limits for the whole batch, the same answers and cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from moa.cli import cli
from moa.testing import FakeOpenAIServer, Reply

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def question(n: int) -> str:
    return f"<question {n:03d}>"


def write_inputs(tmp_path: Path, fake: FakeOpenAIServer, rows: int, **provider: Any) -> list[str]:
    config = {
        "providers": {"fake": {"base_url": fake.base_url, **provider}},
        "proposers": [{"model": "p1"}, {"model": "p2"}, {"model": "p3"}],
        "aggregator": {"model": "agg"},
        "layers": 2,
        "max_attempts": 1,
    }
    (tmp_path / "moa.yaml").write_text(json.dumps(config))
    lines = [json.dumps({"instruction": question(n)}) + "\n" for n in range(rows)]
    (tmp_path / "in.jsonl").write_text("".join(lines))
    return [str(tmp_path / "in.jsonl"), "--config", str(tmp_path / "moa.yaml")]


def answer_from_content(body: dict[str, Any], n: int) -> Reply:
    """An answer that depends only on the request, so any schedule gives the same output."""
    digest = hashlib.sha256(json.dumps(body["messages"]).encode()).hexdigest()[:10]
    return Reply(text=f"{body['model']} says {digest}", latency=0.02)


def batch(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["batch", *map(str, args)], catch_exceptions=False)


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cache_keys(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {key for (key,) in db.execute("SELECT key FROM calls_v1")}


def start(args: list[str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "moa", "batch", *args]
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy()
    )


def wait_for_lines(out: Path, process: subprocess.Popen[bytes], count: int) -> None:
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_bytes().count(b"\n") >= count):
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, f"the batch wrote fewer than {count} rows in 120 s"
        time.sleep(0.02)


def worker_pids(driver: int) -> list[int]:
    """The worker processes the driver spawned (children running multiprocessing's spawn)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == driver and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def finish(process: subprocess.Popen[bytes]) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, err.decode()


def test_workers_give_the_same_answers_and_cache_keys_as_one_process(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    fake.respond("*", answer_from_content)
    common = write_inputs(tmp_path, fake, 12)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    first = batch(*common, "-o", one, "--cache", tmp_path / "one.db", "-j", "4")
    assert first.exit_code == 0, first.output
    second = batch(*common, "-o", two, "--cache", tmp_path / "two.db", "-j", "4", "--workers", "2")
    assert second.exit_code == 0, second.output
    by_id = {r["id"]: r["outputs"] for r in read_output(one)}
    assert by_id == {r["id"]: r["outputs"] for r in read_output(two)}
    assert sorted(by_id) == list(range(12))
    assert cache_keys(tmp_path / "one.db") == cache_keys(tmp_path / "two.db")
    assert len(cache_keys(tmp_path / "one.db")) == 12 * 4


def test_provider_max_concurrency_holds_across_worker_processes(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    fake.respond("*", lambda body, n: Reply(latency=0.1))
    common = write_inputs(tmp_path, fake, 12, max_concurrency=3)
    out = tmp_path / "out.jsonl"
    result = batch(*common, "-o", out, "-j", "12", "--workers", "2", "--no-cache")
    assert result.exit_code == 0, result.output
    assert len(fake.requests) == 12 * 4
    # Per-worker limits would let 2 x 3 calls in flight; the shared gate allows 3 in all.
    assert fake.max_in_flight == 3


def test_the_shared_cache_serves_a_rerun_with_workers(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    common = write_inputs(tmp_path, fake, 6)
    cache = ["--cache", str(tmp_path / "calls.db")]
    assert batch(*common, "-o", tmp_path / "a.jsonl", *cache, "--workers", "2").exit_code == 0
    fake.reset()
    again = batch(*common, "-o", tmp_path / "b.jsonl", *cache, "--workers", "2")
    assert again.exit_code == 0, again.output
    assert fake.requests == []
    assert "cache 24 hits/0 misses" in again.output


def test_a_killed_worker_has_its_rows_rerun_and_none_written_twice(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    rows = 30
    fake.respond("*", lambda body, n: Reply(latency=0.15))
    common = write_inputs(tmp_path, fake, rows)
    out = tmp_path / "out.jsonl"
    process = start([*common, "-o", str(out), "-j", "6", "--workers", "2", "--no-cache"])
    try:
        wait_for_lines(out, process, 4)
        workers = worker_pids(process.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
    finally:
        code, err = finish(process)
    assert code == 0, err
    assert "re-run after their worker stopped" in err
    records = read_output(out)
    assert sorted(r["id"] for r in records) == list(range(rows))  # each id exactly once
    assert all(r["ok"] for r in records)


def test_a_killed_batch_with_workers_resumes_without_duplicates(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    rows = 30
    fake.respond("*", lambda body, n: Reply(latency=0.15))
    common = write_inputs(tmp_path, fake, rows)
    out = tmp_path / "out.jsonl"
    process = start([*common, "-o", str(out), "-j", "4", "--workers", "2", "--no-cache"])
    try:
        wait_for_lines(out, process, 4)
        workers = worker_pids(process.pid)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        finish(process)
    before = read_output(out)
    assert 4 <= len(before) < rows
    deadline = time.monotonic() + 15  # orphaned workers notice the driver is gone and exit
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}/cmdline").exists() for pid in workers)
    fake.reset()
    result = batch(*common, "-o", out, "-j", "4", "--workers", "2", "--no-cache")
    assert result.exit_code == 0, result.output
    records = read_output(out)
    assert sorted(r["id"] for r in records) == list(range(rows))
    assert records[: len(before)] == before
    finished_before = {r["id"] for r in before}
    for n in range(rows):  # finished rows were not asked again
        assert any(question(n) in r.text for r in fake.requests) == (n not in finished_before)


def test_a_bad_config_is_one_line_from_the_driver(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    common = write_inputs(tmp_path, fake, 2)
    config = json.loads((tmp_path / "moa.yaml").read_text())
    config["providers"]["fake"]["api_key_env"] = "MOA_TEST_MISSING_KEY"
    (tmp_path / "moa.yaml").write_text(json.dumps(config))
    result = CliRunner().invoke(
        cli, ["batch", *common, "-o", str(tmp_path / "o.jsonl"), "--workers", "2"]
    )
    assert result.exit_code == 2
    assert "MOA_TEST_MISSING_KEY" in result.output and "Traceback" not in result.output
    assert fake.requests == []
