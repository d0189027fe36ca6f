"""How close a MoA run comes to its critical path.

A run with L layers whose calls each take `latency` seconds cannot finish before
(L - 1) x latency (the proposer layers, each as slow as one call when its agents run
concurrently) + latency (the aggregator). This script runs a 3-layer MoA with 6 proposers
against the fake server at a fixed per-call latency and prints end-to-end latency and time
to first token as ratios to that bound. Target: <= 1.05.

    python benchmarks/overhead.py [--latency 1.0] [--runs 10] [--proposers 6] [--layers 3]
                                  [--tracing absent|off|on] [--hook-cost]

--tracing: `absent` hides OpenTelemetry as if the [otel] extra were not installed; `off` (the
default) has the API installed and no SDK, as a library user who does not trace; `on`
records every span with the SDK and exports them in batches (as JSON, to nowhere).
--hook-cost: instead of runs, time the tracing hooks alone in-process (an agent-call span around
a call that does nothing), in microseconds per agent call, against the bare call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from _fake_upstream import fake_upstream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per upstream call")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--proposers", type=int, default=6)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--tracing", choices=("absent", "off", "on"), default="off")
    parser.add_argument("--hook-cost", action="store_true")
    args = parser.parse_args()
    provider = _tracing(args.tracing)
    if args.hook_cost:
        _hook_cost(args.tracing)
        return

    from moa import MoA, parse_config

    with fake_upstream("--latency", str(args.latency)) as base_url:
        config = parse_config(
            {
                "providers": {"fake": {"base_url": base_url}},
                "proposers": [{"model": f"proposer-{i}"} for i in range(args.proposers)],
                "aggregator": {"model": "aggregator"},
                "layers": args.layers,
            }
        )
        bound = args.layers * args.latency
        with MoA.from_config(config) as moa:
            moa.run("warm up the connection pool")
            totals, ttfts = [], []
            for run in range(args.runs):
                started = time.perf_counter()
                result = moa.run(f"question {run}")
                totals.append(time.perf_counter() - started)
                assert result.ttft_s is not None
                ttfts.append(result.ttft_s)

    if provider is not None:
        provider.shutdown()  # exports what is left: part of tracing's cost
    calls = args.proposers * (args.layers - 1) + 1
    print(
        f"{args.layers} layers, {args.proposers} proposers, {calls} calls per run, "
        f"{args.latency:g} s per call, {args.runs} runs, tracing {args.tracing}"
    )
    print(f"critical-path bound: {bound:.3f} s")
    for name, values in (("end-to-end", totals), ("time to first token", ttfts)):
        median, worst = statistics.median(values), max(values)
        print(
            f"{name:>20}: median {median:.3f} s = {median / bound:.3f} x bound, "
            f"worst {worst:.3f} s = {worst / bound:.3f} x bound, "
            f"overhead {1000 * (median - bound):.0f} ms"
        )
    ratio = statistics.median(totals) / bound
    print(f"target <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'} ({ratio:.3f})")


def _hook_cost(mode: str, calls: int = 20000) -> None:
    import asyncio

    from moa import tracing
    from moa.calls import AgentCall
    from moa.config import Agent
    from moa.results import AgentResult

    call = AgentCall(Agent(provider="fake", model="m"), [], [], layer=1, index=0)
    result = AgentResult(layer=1, index=0, provider="fake", model="m", status="ok")

    async def answer() -> AgentResult:
        return result

    async def bare() -> None:
        for _ in range(calls):
            await answer()

    async def traced() -> None:
        for _ in range(calls):
            await tracing.traced_call(call, {}, answer())

    def timed(work: Any) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            asyncio.run(work())
            best = min(best, time.perf_counter() - started)
        return best / calls * 1e6

    plain, hooked = timed(bare), timed(traced)
    print(f"tracing {mode}: bare call {plain:.2f} us, with its span {hooked:.2f} us")
    print(f"hooks cost {hooked - plain:.2f} us per agent call, best of 5 x {calls} calls")


def _tracing(mode: str) -> Any:
    if mode == "absent":
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]
        return None
    if mode == "off":
        return None
    import os

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider()
    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sink)))
    trace.set_tracer_provider(provider)
    return provider


if __name__ == "__main__":
    main()
