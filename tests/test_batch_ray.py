"""`moa batch --engine ray` on a real local Ray cluster (2 CPUs) started by this module.

One Ray session serves every test here (starting Ray takes 15-20 s on this machine). The
in-process runs join it; the runs in a subprocess (killed on purpose) join it by address.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moa.testing import FakeOpenAIServer, Reply
from tests.test_batch_workers import (
    answer_from_content,
    batch,
    cache_keys,
    finish,
    question,
    read_output,
    start,
    wait_for_lines,
    write_inputs,
)

ray = pytest.importorskip("ray")  # the [ray] extra; part of [dev], so `make test` runs these

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray cluster for this module; yields its address for subprocess drivers."""
    context = ray.init(
        num_cpus=2, namespace="moa-batch", include_dashboard=False, log_to_driver=False
    )
    try:
        yield str(context.address_info["gcs_address"])
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def test_ray_gives_the_same_answers_and_cache_keys_as_one_process(
    cluster: str, tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    fake.respond("*", answer_from_content)
    common = write_inputs(tmp_path, fake, 8)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert batch(*common, "-o", one, "--cache", tmp_path / "one.db", "-j", "4").exit_code == 0
    result = batch(
        *common,
        "-o",
        two,
        "--cache",
        tmp_path / "two.db",
        "-j",
        "4",
        "--engine",
        "ray",
        "--workers",
        "2",
    )
    assert result.exit_code == 0, result.output
    by_id = {r["id"]: r["outputs"] for r in read_output(one)}
    assert by_id == {r["id"]: r["outputs"] for r in read_output(two)}
    assert sorted(by_id) == list(range(8))
    assert cache_keys(tmp_path / "one.db") == cache_keys(tmp_path / "two.db")


def test_provider_max_concurrency_holds_across_ray_workers(
    cluster: str, tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    fake.respond("*", lambda body, n: Reply(latency=0.1))
    common = write_inputs(tmp_path, fake, 10, max_concurrency=3)
    result = batch(
        *common,
        "-o",
        tmp_path / "out.jsonl",
        "-j",
        "10",
        "--no-cache",
        "--engine",
        "ray",
        "--workers",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert len(fake.requests) == 10 * 4
    assert fake.max_in_flight == 3  # per-worker limits would allow 6


def test_a_killed_ray_worker_has_its_rows_rerun_and_none_written_twice(
    cluster: str, tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    rows = 24
    fake.respond("*", lambda body, n: Reply(latency=0.15))
    common = write_inputs(tmp_path, fake, rows)
    out = tmp_path / "out.jsonl"
    args = [*common, "-o", str(out), "-j", "6", "--no-cache", "--workers", "2"]
    earlier = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    process = start([*args, "--engine", "ray", "--ray-address", cluster])
    try:
        wait_for_lines(out, process, 3)
        (name, *_) = sorted(
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("row-worker-") and a["name"] not in earlier
        )
        actor = ray.get_actor(name, namespace="moa-batch")
        pid = ray.get(actor.pid.remote())
        os.kill(pid, signal.SIGKILL)  # the worker process dies; Ray restarts the actor
    finally:
        code, err = finish(process)
    assert code == 0, err
    assert "re-run after their worker stopped" in err
    records = read_output(out)
    assert sorted(r["id"] for r in records) == list(range(rows))
    assert all(r["ok"] for r in records)


def test_a_killed_ray_driver_resumes_without_duplicates(
    cluster: str, tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    rows = 24
    fake.respond("*", lambda body, n: Reply(latency=0.15))
    common = write_inputs(tmp_path, fake, rows)
    out = tmp_path / "out.jsonl"
    args = [*common, "-o", str(out), "-j", "4", "--no-cache", "--workers", "2"]
    process = start([*args, "--engine", "ray", "--ray-address", cluster])
    try:
        wait_for_lines(out, process, 3)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        finish(process)
    before = read_output(out)
    assert 3 <= len(before) < rows
    time.sleep(1)  # the killed driver's actors go with it
    fake.reset()
    result = batch(*args, "--engine", "ray")
    assert result.exit_code == 0, result.output
    records = read_output(out)
    assert sorted(r["id"] for r in records) == list(range(rows))
    assert records[: len(before)] == before
    finished_before = {r["id"] for r in before}
    for n in range(rows):
        assert any(question(n) in r.text for r in fake.requests) == (n not in finished_before)


def test_without_ray_the_engine_names_the_extra_to_install(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    import subprocess
    import sys

    common: list[Any] = write_inputs(tmp_path, fake, 1)
    code = "import sys; sys.modules['ray'] = None\nfrom moa.cli import main\nmain()\n"
    args = ["batch", *common, "-o", str(tmp_path / "o.jsonl"), "--engine", "ray"]
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'mixture-of-agents[ray]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


def test_ray_address_without_the_ray_engine_is_a_usage_error(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    common: list[Any] = write_inputs(tmp_path, fake, 1)
    result = batch(*common, "-o", tmp_path / "o.jsonl", "--ray-address", "auto")
    assert result.exit_code == 2 and "--ray-address needs --engine ray" in result.output
