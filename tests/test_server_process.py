"""`moa serve` as users run it: its own process, stopped with SIGTERM, its logs read back."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest

from moa.testing import FakeOpenAIServer, Reply

UPSTREAM_SECRET = "upstream-secret-7f3a9c2e51d0"
CLIENT_KEYS = ("client-key-AAAA1111bbbb", "client-key-CCCC2222dddd")


class ServeProcess:
    """`python -m moa ... serve ... --port 0`, with stdout and stderr kept in files."""

    def __init__(self, args: list[str], env: dict[str, str], workdir: Path) -> None:
        self.stdout = workdir / "stdout.log"
        self.stderr = workdir / "stderr.log"
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moa", *args, "--port", "0"],
                stdout=out,
                stderr=err,
                env={**os.environ, **env},
            )
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = re.search(r" at (http://\S+)/v1 ", self.stdout.read_text())
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                raise AssertionError(f"moa serve exited early:\n{self.logs()}")
            time.sleep(0.05)
        raise AssertionError(f"moa serve did not start:\n{self.logs()}")

    def terminate(self, timeout: float = 20) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def logs(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()


@pytest.fixture
def start_serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServeProcess:
        workdir = tmp_path / f"serve-{len(started)}"
        workdir.mkdir()
        server = ServeProcess(list(args), env or {}, workdir)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


def write_config(path: Path, fake: FakeOpenAIServer, *, key_env: str | None = None) -> Path:
    provider = {"base_url": fake.base_url, **({"api_key_env": key_env} if key_env else {})}
    config = {
        "providers": {"fake": provider},
        "proposers": [{"model": "p1"}, {"model": "p2"}],
        "aggregator": {"model": "agg"},
        "layers": 2,
        "max_attempts": 1,
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def chat(stream: bool = False, model: str = "moa") -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_secret_keys_never_appear_in_the_server_logs(
    fake: FakeOpenAIServer, tmp_path: Path, start_serve: Callable[..., ServeProcess]
) -> None:
    config = write_config(tmp_path / "moa.yaml", fake, key_env="MOA_TEST_UPSTREAM_KEY")
    server = start_serve(
        "-v",  # debug logging: the most there is to leak
        "serve",
        "--config",
        str(config),
        env={"MOA_API_KEYS": ",".join(CLIENT_KEYS), "MOA_TEST_UPSTREAM_KEY": UPSTREAM_SECRET},
    )
    # Keys in URLs reach the access log unless redacted.
    models = httpx2.get(
        f"{server.url}/v1/models?api_key={CLIENT_KEYS[0]}", headers=bearer(CLIENT_KEYS[0])
    )
    assert models.status_code == 200
    assert httpx2.get(f"{server.url}/healthz?token={UPSTREAM_SECRET}").status_code == 200
    answer = httpx2.post(
        f"{server.url}/v1/chat/completions", json=chat(), headers=bearer(CLIENT_KEYS[1])
    )
    assert answer.status_code == 200
    assert fake.requests[-1].headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"
    # An upstream that echoes the key back in its error: logged by us as the run's failure.
    echo = json.dumps({"error": {"message": f"Incorrect API key provided: {UPSTREAM_SECRET}"}})
    fake.script("agg", Reply(status=401, body=echo))
    failed = httpx2.post(
        f"{server.url}/v1/chat/completions", json=chat(), headers=bearer(CLIENT_KEYS[1])
    )
    assert failed.status_code == 502
    assert UPSTREAM_SECRET not in failed.text
    refused = httpx2.post(
        f"{server.url}/v1/chat/completions", json=chat(), headers=bearer(UPSTREAM_SECRET)
    )
    assert refused.status_code == 401

    server.terminate()
    logs = server.logs()
    assert "GET /v1/models?api_key=*** HTTP/1.1" in logs  # the access log is there, redacted
    assert "Incorrect API key provided: ***" in logs
    for secret in (UPSTREAM_SECRET, *CLIENT_KEYS):
        assert secret not in logs


def test_sigterm_lets_the_stream_in_flight_finish_and_answers_newcomers_503(
    fake: FakeOpenAIServer, tmp_path: Path, start_serve: Callable[..., ServeProcess]
) -> None:
    config = write_config(tmp_path / "moa.yaml", fake)
    server = start_serve("serve", "--config", str(config), "--grace-period", "10")
    fake.script("agg", Reply(text="s" * 32, chunk_delay=0.3))  # four pieces: 1.2 s
    url = f"{server.url}/v1/chat/completions"
    with httpx2.stream("POST", url, json=chat(stream=True), timeout=30) as response:
        lines = response.iter_lines()
        for line in lines:
            if '"content":"s' in line:
                break
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3
        while True:  # draining begins promptly, and the listener stays open meanwhile
            health = httpx2.get(f"{server.url}/healthz", timeout=1)
            if health.status_code == 503:
                break
            assert time.monotonic() < deadline, "not draining after SIGTERM"
            time.sleep(0.05)
        assert health.json() == {"status": "draining"}
        newcomer = httpx2.post(url, json=chat(), timeout=5)  # a new connection: not refused
        assert newcomer.status_code == 503
        assert newcomer.json()["error"]["code"] == "server_shutting_down"
        rest = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in rest[:-1])
    assert text.endswith("s" * 8)
    assert server.process.wait(10) in (0, -signal.SIGTERM)
    assert fake.requests_for("agg")[0].disconnected is False


def test_a_preset_is_served_under_its_own_name(
    start_serve: Callable[..., ServeProcess],
) -> None:
    server = start_serve(
        "serve", "--preset", "together-lite", env={"TOGETHER_API_KEY": "not-a-real-key-123456"}
    )
    models = httpx2.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["together-lite"]
    missing = httpx2.post(f"{server.url}/v1/chat/completions", json=chat(model="moa"))
    assert missing.status_code == 404
    server.terminate()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        pytest.param(
            ["--host", "0.0.0.0"],
            {},
            "refusing to serve on 0.0.0.0 without authentication",
            id="public-without-keys",
        ),
        pytest.param([], {"MOA_API_KEYS": "short"}, "MOA_API_KEYS", id="short-key"),
        pytest.param(
            ["--cors-origin", "localhost:3000/app"],
            {},
            "--cors-origin 'localhost:3000/app': give an origin such as",
            id="bad-cors-origin",
        ),
    ],
)
def test_unsafe_settings_are_refused_before_serving(
    fake: FakeOpenAIServer, tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    config = write_config(tmp_path / "moa.yaml", fake)
    done = subprocess.run(
        [sys.executable, "-m", "moa", "serve", "--config", str(config), "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MOA_API_KEYS": "", **env},
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stderr.count("\n") == 1  # one clear line
