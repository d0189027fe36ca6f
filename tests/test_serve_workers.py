"""`moa serve --workers N`: several server processes on one port, stopped together."""

from __future__ import annotations

import concurrent.futures
import signal
from collections.abc import Callable
from pathlib import Path

import openai

from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import closed_after_test
from tests.test_server_process import ServeProcess, start_serve, write_config

__all__ = ["start_serve"]  # the fixture, used by name below


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_workers_share_the_port_answer_and_stop_together(
    tmp_path: Path, fake: FakeOpenAIServer, start_serve: Callable[..., ServeProcess]
) -> None:
    fake.respond("*", lambda body, n: Reply(latency=0.2))
    config = write_config(tmp_path / "moa.yaml", fake)
    server = start_serve("serve", "--config", str(config), "--workers", "2")
    workers = children(server.process.pid)
    assert len(workers) == 2, server.logs()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    closed_after_test(client)

    def ask(n: int) -> str:
        answer = client.chat.completions.create(
            model="moa", messages=[{"role": "user", "content": f"question {n}"}]
        )
        return answer.choices[0].message.content or ""

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert all(a.startswith("agg answer") for a in answers)
    assert len(fake.requests) == 8 * 3
    assert server.terminate() in (0, -signal.SIGTERM), server.logs()
    assert not any(Path(f"/proc/{pid}/cmdline").exists() for pid in workers)
    assert "Traceback" not in server.logs()
