"""Throughput of `moa batch` against a fake provider with a fixed latency.

    python benchmarks/batch_throughput.py                  # 2,000 rows, 3 proposers, 2 layers
    python benchmarks/batch_throughput.py --rows 200 --layers 3
    python benchmarks/batch_throughput.py --workers 2               # moa batch --workers 2
    python benchmarks/batch_throughput.py --workers 2 --engine ray  # on a local Ray cluster

The fake OpenAI-compatible server runs as its own process (sharing one interpreter with the
client would measure the server's share of the GIL, not the batch), and so does the batch: the
real `python -m moa batch` command, timed from launch to exit, interpreter start included.

The provider allows `--concurrency` calls in flight (max_concurrency) and the batch runs as
many rows at once, so the calls can never finish sooner than the bound

    calls × latency / concurrency

and the figure reported is wall time ÷ bound (1.0 is perfect; the target is at most 1.2).
Peak memory is the batch process's maximum resident set size. A second run into a new output
then shows a rerun served wholly from the call cache.

`--in-process` measures the batch machinery alone (runner, store, cache, rate limiter, engine)
with a provider that only sleeps for the latency: no HTTP client, no server. The gap between
the two runs is the cost of the HTTP client stack per call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Measured:
    wall_s: float
    peak_rss_mb: float
    exit_code: int
    #: CPU seconds (user + system) of the batch process and its children (worker processes).
    cpu_s: float = 0.0


def start_fake_server(latency: float) -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "moa.testing.fake_server", "--port", "0", "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline().strip()
    if not line.startswith("listening "):
        server.kill()
        raise SystemExit(f"the fake server did not start: {line!r}")
    return server, line.removeprefix("listening ")


def write_inputs(directory: Path, base_url: str, args: argparse.Namespace) -> tuple[Path, Path]:
    config: dict[str, Any] = {
        "providers": {"fake": {"base_url": base_url, "max_concurrency": args.concurrency}},
        "proposers": [{"model": f"proposer-{n}"} for n in range(1, args.proposers + 1)],
        "aggregator": {"model": "aggregator"},
        "layers": args.layers,
    }
    config_path = directory / "moa.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    input_path = directory / "rows.jsonl"
    with input_path.open("w") as file:
        for n in range(args.rows):
            file.write(json.dumps({"instruction": f"Benchmark question number {n}."}) + "\n")
    return config_path, input_path


def run_batch(arguments: list[str]) -> Measured:
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "moa", "batch", *arguments])
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    # On Linux wait4 reports the process and the children it reaped (its worker processes).
    cpu = usage.ru_utime + usage.ru_stime
    return Measured(wall, usage.ru_maxrss / scale, process.returncode, cpu)


class SleepingProvider:
    """Answers after `latency` seconds, doing nothing else: a provider with no transport."""

    def __init__(self, name: str, latency: float) -> None:
        self.name = name
        self.latency = latency

    async def complete(self, request: Any) -> Any:
        from moa.providers.base import Completion
        from moa.results import Usage

        await asyncio.sleep(self.latency)
        return Completion(f"{request.model} says hello", "stop", Usage(40, 8))

    async def stream(self, request: Any) -> AsyncIterator[Any]:
        from moa.providers.base import StreamChunk
        from moa.results import Usage

        await asyncio.sleep(self.latency)
        for piece in (f"{request.model} ", "says ", "hello"):
            yield StreamChunk(text=piece)
        yield StreamChunk(finish_reason="stop", usage=Usage(40, 8))

    async def count_tokens(self, model: str, messages: Sequence[Any]) -> int:
        from moa.providers.base import estimate_tokens

        return estimate_tokens(messages)

    def context_window(self, model: str) -> int | None:
        return None

    async def aclose(self) -> None:
        return None


def run_in_process(
    config_path: Path, source: Path, output: Path, args: argparse.Namespace
) -> Measured:
    """The batch machinery of `moa batch` in this process, over SleepingProvider."""
    from moa.batch.distributed import RowLedger
    from moa.batch.progress import BatchStats, PlainProgress
    from moa.batch.rows import load_rows
    from moa.batch.runner import RowWorker, run_batch
    from moa.batch.store import OutputStore
    from moa.config import load_config
    from moa.engine import MoA
    from moa.providers.cache import CachedProvider, CallCache
    from moa.providers.limits import Limits, RateLimitedProvider

    config = load_config(config_path)
    pipeline = config.resolve()
    rows = load_rows(source)

    async def go() -> None:
        cache = None if args.no_cache else CallCache(output.with_suffix(".db"))
        provider: Any = RateLimitedProvider(
            SleepingProvider("fake", args.latency), Limits(max_concurrency=args.concurrency)
        )
        if cache is not None:
            provider = CachedProvider(provider, cache, base_url="in-process")
        worker = RowWorker(MoA(pipeline, {"fake": provider}, name="bench"), "bench", cache)
        store = OutputStore.open(output)
        stats = BatchStats(total=len(rows))
        progress = PlainProgress(sys.stderr, interval=5)
        progress.start(stats)
        try:
            ledger = RowLedger(rows, store, stats, progress)
            await run_batch(worker, ledger, concurrency=args.concurrency)
        finally:
            progress.finish(stats)
            await store.aclose()
            await worker.aclose()

    started = time.perf_counter()
    asyncio.run(go())
    wall = time.perf_counter() - started
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return Measured(wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 0)


def count_calls(output: Path) -> tuple[int, int]:
    """(rows answered, upstream calls made) according to the batch output."""
    rows = calls = 0
    with output.open() as file:
        for line in file:
            record = json.loads(line)
            rows += record["ok"]
            for run in record["runs"]:
                calls += sum(len(layer) for layer in run["layers"]) + 1
    return rows, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--proposers", type=int, default=3)
    parser.add_argument(
        "--layers", type=int, default=2, help="the aggregator's included, as in a config"
    )
    parser.add_argument("--latency", type=float, default=0.1, help="seconds per fake call")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--no-cache", action="store_true", help="run the batch without the cache")
    parser.add_argument("--workers", type=int, default=1, help="moa batch --workers N")
    parser.add_argument("--engine", choices=["local", "ray"], default="local")
    parser.add_argument(
        "--in-process", action="store_true", help="no HTTP: the batch machinery alone"
    )
    args = parser.parse_args()
    if args.in_process:
        with tempfile.TemporaryDirectory(prefix="moa-bench-") as temporary:
            directory = Path(temporary)
            config, source = write_inputs(directory, "http://127.0.0.1:9/v1", args)
            first = run_in_process(config, source, directory / "out.jsonl", args)
            rows, calls = count_calls(directory / "out.jsonl")
        report(args, rows, calls, first, None, "in-process, no HTTP")
        return

    server, base_url = start_fake_server(args.latency)
    try:
        with tempfile.TemporaryDirectory(prefix="moa-bench-") as temporary:
            directory = Path(temporary)
            config, source = write_inputs(directory, base_url, args)
            common = [str(source), "--config", str(config), "--concurrency", str(args.concurrency)]
            common += ["--progress-interval", "5"]
            if args.workers > 1:
                common += ["--workers", str(args.workers)]
            if args.engine != "local":
                common += ["--engine", args.engine]
            common += ["--no-cache"] if args.no_cache else ["--cache", str(directory / "c.db")]

            server_cpu = process_cpu(server.pid)
            first = run_batch([*common, "--output", str(directory / "out.jsonl")])
            server_cpu = process_cpu(server.pid) - server_cpu
            rows, calls = count_calls(directory / "out.jsonl")
            cached = None
            if not args.no_cache:
                cached = run_batch([*common, "--output", str(directory / "again.jsonl")])
    finally:
        server.terminate()
        server.wait(timeout=10)

    report(args, rows, calls, first, cached, "HTTP to the fake server in its own process")
    print(f"fake server CPU {server_cpu:.2f} s: {server_cpu / calls * 1000:.2f} ms per call")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(
    args: argparse.Namespace,
    rows: int,
    calls: int,
    first: Measured,
    cached: Measured | None,
    transport: str,
) -> None:
    if calls == 0:
        raise SystemExit(f"the batch wrote no rows (exit code {first.exit_code})")
    bound = calls * args.latency / args.concurrency
    print()
    print(
        f"{transport}: rows {args.rows} ({rows} answered), {args.proposers} proposers, "
        f"{args.layers} layers, latency {args.latency * 1000:.0f} ms, "
        f"concurrency {args.concurrency}, cache {'off' if args.no_cache else 'on'}, "
        f"workers {args.workers}, engine {args.engine}"
    )
    print(f"calls {calls}; bound = calls x latency / concurrency = {bound:.2f} s")
    print(
        f"wall {first.wall_s:.2f} s  ratio to bound {first.wall_s / bound:.3f}  "
        f"({rows / first.wall_s:.1f} rows/s, {calls / first.wall_s:.0f} calls/s)  "
        f"peak RSS {first.peak_rss_mb:.0f} MB  exit {first.exit_code}"
    )
    if first.cpu_s:
        print(
            f"batch CPU {first.cpu_s:.2f} s (workers included): "
            f"{first.cpu_s / calls * 1000:.2f} ms per upstream call"
        )
    if cached is not None:
        print(
            f"rerun from the cache: wall {cached.wall_s:.2f} s  peak RSS "
            f"{cached.peak_rss_mb:.0f} MB  exit {cached.exit_code}"
        )
    if first.exit_code != 0 or rows != args.rows:
        raise SystemExit("the batch did not answer every row")


if __name__ == "__main__":
    main()
