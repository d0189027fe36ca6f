"""Slow clients against `moa serve`: do normal requests keep their latency, and are the slow
connections cut?

    python benchmarks/slow_clients.py                   # 300 slow clients, header timeout 2 s
    python benchmarks/slow_clients.py --slow 500 --header-timeout 5

Three processes: the fake upstream, the real `python -m moa serve`, and this one. First the
latency of plain requests is measured alone (p50 over `--requests`); then `--slow` clients
connect from another loopback address (127.0.0.2, so the per-client connection cap of the
normal client's address is not theirs) and send one header byte a second, never finishing;
the same requests are measured again while they hang on. Reported: both p50s and their ratio
(target: at most 1.5), how many slow connections the server closed, and how long the last one
lasted (target: within the header timeout plus a second).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2

_CHAT = {"model": "moa", "messages": [{"role": "user", "content": "hi"}]}


def _start(args: list[str], pattern: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    out = log.open("wb")
    process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text())
        if found:
            return process, found.group(1)
        if process.poll() is not None:
            raise SystemExit(f"{args[2]} exited:\n{log.read_text()}")
        time.sleep(0.05)
    raise SystemExit(f"{args[2]} did not start:\n{log.read_text()}")


async def _latencies(url: str, count: int) -> list[float]:
    timings = []
    async with httpx2.AsyncClient(base_url=url, timeout=30) as http:
        for _ in range(count):
            started = time.perf_counter()
            response = await http.post("/v1/chat/completions", json=_CHAT)
            response.raise_for_status()
            timings.append(time.perf_counter() - started)
    return timings


async def _slow_client(host: str, port: int, cut: list[float]) -> None:
    opened = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
    except OSError:
        return
    line = b"POST /v1/chat/completions HTTP/1.1\r\nX-Slow: " + b"a" * 1000
    try:
        for byte in line:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                    break
            except TimeoutError:
                continue
        else:
            return
    except (ConnectionError, OSError):
        pass
    cut.append(time.monotonic() - opened)
    writer.close()


async def _run(url: str, slow: int, requests: int) -> tuple[list[float], list[float], list[float]]:
    await _latencies(url, 5)  # warm up
    alone = await _latencies(url, requests)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    cut: list[float] = []
    clients = [asyncio.create_task(_slow_client(host, int(port), cut)) for _ in range(slow)]
    await asyncio.sleep(0.5)
    beside = await _latencies(url, requests)
    await asyncio.wait(clients, timeout=60)
    for client in clients:
        client.cancel()
    return alone, beside, cut


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slow", type=int, default=300)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--header-timeout", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        upstream, upstream_url = _start(
            [sys.executable, "-m", "moa.testing.fake_server", "--port", "0"],
            r"(http://\S+)",
            work / "fake.log",
        )
        config = work / "moa.yaml"
        base = upstream_url.rstrip("/") + ("" if upstream_url.endswith("/v1") else "/v1")
        config.write_text(
            json.dumps(
                {
                    "providers": {"fake": {"base_url": base}},
                    "proposers": [{"model": "p1"}, {"model": "p2"}],
                    "aggregator": {"model": "agg"},
                }
            )
        )
        command = [sys.executable, "-m", "moa", "serve", "--config", str(config), "--port", "0"]
        command += ["--header-timeout", str(args.header_timeout)]
        server, url = _start(command, r" at (http://\S+)/v1 ", work / "serve.log")
        try:
            alone, beside, cut = asyncio.run(_run(url, args.slow, args.requests))
        finally:
            for process in (server, upstream):
                process.terminate()
                process.wait(20)
    p50_alone = statistics.median(alone) * 1000
    p50_beside = statistics.median(beside) * 1000
    print(
        f"slow clients: {args.slow}, header timeout {args.header_timeout:g} s, "
        f"cpus {os.cpu_count()}"
    )
    print(f"p50 latency alone:              {p50_alone:.1f} ms")
    print(f"p50 latency beside slow clients: {p50_beside:.1f} ms")
    print(f"ratio: {p50_beside / p50_alone:.2f} (target <= 1.5)")
    longest = max(cut, default=float("nan"))
    print(
        f"slow connections cut by the server: {len(cut)} of {args.slow}, "
        f"the last after {longest:.1f} s"
    )


if __name__ == "__main__":
    main()
