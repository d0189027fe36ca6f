"""Server overhead of `moa serve` under 100 concurrent streaming clients.

    python benchmarks/serve_load.py                        # 100 clients, 3 proposers, 2 layers
    python benchmarks/serve_load.py --latency 1 --requests 5

Three processes, so that none measures another's share of the GIL: the fake OpenAI-compatible
upstream (`python -m moa.testing.fake_server --latency L`), the real `python -m moa serve` with
a generated config pointing at it, and this one, which runs the clients. Each client is one
user: its own HTTP connection, streaming a chat completion on a fixed schedule, about one per
request duration; the users' schedules are spread evenly over that duration (users do not all
click in the same millisecond). The first two requests of each user warm connections up and
are not counted.

The layers run one after another and each waits for an upstream call, so no first token can
come sooner than the upstream critical path

    layers × (L + one bare upstream call's own time)

where a bare call's own time (the fake server's HTTP handling beyond its sleep of L) is
measured first, by streaming straight from the fake server. The overhead of a request is its
time to first token (the first chunk with text) minus that path: the client-to-server hop,
the server, the engine and its upstream client. Reported: p50 and p99 over all counted
requests, and the error count (a status other than 200, an error event, a stream without
[DONE], or a wrong answer). Target: p99 <= 50 ms and no errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
from _process import ready_process

_QUESTION = [{"role": "user", "content": "hi"}]
#: Each user sends a request every _PERIOD × (critical path) seconds: a request lasts a little
#: longer than its critical path, so about `clients` streams are open at any moment.
_PERIOD = 1.05
#: Requests per user not counted: until every user has finished one, connections are still
#: being opened and the first users' requests overlap the server's start-up.
_WARM_UP = 2


@dataclass
class Tally:
    overheads_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# --- processes ----------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux); None where /proc is not available."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _config(base_url: str, proposers: int, layers: int, shared: bool) -> dict[str, object]:
    """With `shared`, every agent uses one provider (one HTTP connection pool); otherwise each
    agent has a provider of its own, as when the models come from different hosts."""
    names = [f"p{n}" for n in range(1, proposers + 1)]
    providers = ["fake"] if shared else [*names, "agg"]
    return {
        "providers": {name: {"base_url": base_url} for name in providers},
        "proposers": [{"model": m, "provider": "fake" if shared else m} for m in names],
        "aggregator": {"model": "agg", "provider": "fake" if shared else "agg"},
        "layers": layers,
    }


# --- clients ------------------------------------------------------------------------------


async def _first_token_s(http: httpx2.AsyncClient, url: str, model: str, expect: str) -> float:
    """Stream one answer; return its time to first token, or raise with what went wrong."""
    body = {"model": model, "messages": _QUESTION, "stream": True}
    started = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    done = False
    async with http.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']['message']}")
            for choice in chunk["choices"]:
                if piece := choice["delta"].get("content"):
                    first = first if first is not None else time.perf_counter() - started
                    text.append(piece)
    if not done or first is None:
        raise RuntimeError("the stream ended without text or without [DONE]")
    if not "".join(text).startswith(expect):
        raise RuntimeError(f"unexpected answer {''.join(text)!r}")
    return first


def _client_connection() -> httpx2.AsyncClient:
    # Plain HTTP on loopback: skip building a TLS context (tens of ms of CPU per client).
    return httpx2.AsyncClient(timeout=120, verify=False)


async def _bare_upstream_s(upstream: str, calls: int = 30) -> float:
    """The median time to first token of a call straight to a fake server with no latency,
    one at a time over a warm connection: what an upstream call costs beyond its sleep."""
    async with _client_connection() as http:
        times = [
            await _first_token_s(http, f"{upstream}/chat/completions", "agg", "agg answer")
            for _ in range(calls + 1)
        ]
    return statistics.median(times[1:])


async def _user(url: str, path_s: float, requests: int, tally: Tally, offset: float) -> None:
    """One user: its own connection, a request every `_PERIOD × path_s` seconds from `offset`.

    A fixed schedule keeps the users spread out. Started back to back instead, the users whose
    requests were slowed together once (by warm-up, say) would stay in lockstep ever after and
    measure their own bursts rather than the server."""
    loop = asyncio.get_running_loop()
    start = loop.time() + offset
    async with _client_connection() as http:
        for number in range(_WARM_UP + requests):
            await asyncio.sleep(max(0.0, start + number * _PERIOD * path_s - loop.time()))
            try:
                ttft = await _first_token_s(http, url, "moa", "agg answer")
            except Exception as error:
                tally.errors.append(f"{type(error).__name__}: {error}")
                continue
            if number >= _WARM_UP:
                tally.overheads_ms.append((ttft - path_s) * 1000)


async def _load(url: str, clients: int, requests: int, path_s: float) -> tuple[Tally, float]:
    tally = Tally()
    started = time.perf_counter()
    spacing = _PERIOD * path_s / clients
    await asyncio.gather(
        *(_user(url, path_s, requests, tally, n * spacing) for n in range(clients))
    )
    return tally, time.perf_counter() - started


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


# --- main ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=3, help="counted requests per client")
    parser.add_argument("--latency", type=float, default=3.0, help="seconds per upstream call")
    parser.add_argument("--proposers", type=int, default=3, help="proposers per layer")
    parser.add_argument("--layers", type=int, default=2, help="layers, the aggregator's included")
    parser.add_argument(
        "--shared-provider",
        action="store_true",
        help="all agents on one provider (one HTTP connection pool) instead of one each",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="moa-serve-load-") as tmp:
        workdir = Path(tmp)
        fake = ["-m", "moa.testing.fake_server", "--port", "0"]
        with ready_process(fake, workdir, "bare", r"listening (\S+)") as (bare, _):
            bare_s = asyncio.run(_bare_upstream_s(bare))
        with ready_process(
            [*fake, "--latency", str(args.latency)], workdir, "fake", r"listening (\S+)"
        ) as (upstream, fake_pid):
            path_s = args.layers * (args.latency + bare_s)
            config = workdir / "moa.yaml"
            pipeline = _config(upstream, args.proposers, args.layers, args.shared_provider)
            config.write_text(json.dumps(pipeline))  # JSON is YAML
            serve = ["-m", "moa", "serve", "--config", str(config), "--port", "0"]
            serve += ["--max-concurrency", str(2 * args.clients)]
            os.environ.pop("MOA_API_KEYS", None)
            with ready_process(serve, workdir, "serve", r" at (http://\S+)/v1 ") as (
                url,
                serve_pid,
            ):
                pids = {"moa serve": serve_pid, "fake upstream": fake_pid, "clients": os.getpid()}
                cpu_before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
                tally, wall_s = asyncio.run(
                    _load(f"{url}/v1/chat/completions", args.clients, args.requests, path_s)
                )
                cpu_after = {name: _cpu_seconds(pid) for name, pid in pids.items()}

    calls = args.proposers * (args.layers - 1) + 1
    providers = "one shared provider" if args.shared_provider else "one provider per agent"
    print(
        f"moa serve, {args.clients} concurrent streaming clients × {args.requests} counted "
        f"requests (+{_WARM_UP} warm-up each); {args.layers} layers, {calls} upstream calls per "
        f"request, {providers}"
    )
    print(
        f"critical-path bound: {args.layers} layers × ({args.latency * 1000:.0f} ms latency + "
        f"{bare_s * 1000:.1f} ms bare upstream call) = {path_s * 1000:.1f} ms"
    )
    if tally.overheads_ms:
        print(
            f"server overhead (TTFT − bound) over {len(tally.overheads_ms)} requests: "
            f"p50 {statistics.median(tally.overheads_ms):.1f} ms, "
            f"p99 {_percentile(tally.overheads_ms, 0.99):.1f} ms, "
            f"max {max(tally.overheads_ms):.1f} ms"
        )
    print(f"errors: {len(tally.errors)}")
    for error in sorted(set(tally.errors))[:5]:
        print(f"  {error}")
    used = [
        f"{name} {after - before:.1f} s"
        for name, before in cpu_before.items()
        if before is not None and (after := cpu_after[name]) is not None
    ]
    print(f"wall time {wall_s:.1f} s; CPU time ({os.cpu_count()} CPUs): {', '.join(used) or '?'}")
    return 1 if tally.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
