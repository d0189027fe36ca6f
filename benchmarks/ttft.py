"""Time to first token and end-to-end time under each latency knob, against wait-all.

A fake upstream (its own process) streams every answer at a set token rate (40 tokens/s,
300-token answers) after a heavy-tailed start latency (log-normal, median 0.4 s, σ = 1, so
p95 ≈ 2 s); each aggregator request starts after 0.3 s. Two cases: `tail` (4 proposers) and
`straggler` (the same, plus a fifth proposer that never answers; its timeout is 20 s). For
each case the same questions run under each mode, with the same start latencies drawn for
the same (question, agent, request number):

    wait-all    wait: all, aggregator mode wait (how MoA ran before these knobs)
    cut-off     the straggler cut-off (the default)
    hedge       wait: all, hedge_after: 1.0 s on the proposers
    staircase   wait: all, aggregator mode staircase (the fake server continues "prefill")
    all         cut-off + hedge + staircase

It prints p50/p95 of time to first token and of end-to-end time, each as a ratio to
wait-all measured in the same run.

With `--embedded N` it runs instead N questions of the quality set (benchmarks/data/
quality.jsonl, every k-th row so that each category is in) on the embedded model: 3 proposers
(greedy, and two seeded samples at 0.7, so that both modes get the same candidates), a greedy
synthesizing aggregator, max_tokens 64 to keep the run short. It runs once with the aggregator
waiting and once as a staircase, one question at a time, and prints TTFT and accuracy (scored
as `moa eval match` does) of both, and their paired difference.

    python benchmarks/ttft.py [--runs 8] [--cases tail,straggler] [--modes ...]
    python benchmarks/ttft.py --embedded 24
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moa import MoA, parse_config

TOKENS_PER_S = 40
ANSWER_TOKENS = 300
CHARS_PER_TOKEN = 4
#: The fake server sends 4 tokens per event, 10 events a second.
CHUNK_CHARS = 4 * CHARS_PER_TOKEN
CHUNK_DELAY = 4 / TOKENS_PER_S
AGGREGATOR_START_S = 0.3
HEDGE_AFTER_S = 1.0
MODES = ("wait-all", "cut-off", "hedge", "staircase", "all")
CASES = ("tail", "straggler")


def _answer(seed: str) -> str:
    """300 tokens of filler words (4 characters a token on average, one word each)."""
    rng = random.Random(seed)
    words = ["tide", "moon", "wave", "pull", "sea", "shore", "bulge", "orbit", "earth", "day"]
    return " ".join(f"{rng.choice(words):>3}" for _ in range(ANSWER_TOKENS))[
        : ANSWER_TOKENS * CHARS_PER_TOKEN
    ]


def _start_latency(key: str) -> float:
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    return min(0.4 * math.exp(rng.gauss(0.0, 1.0)), 8.0)


def serve() -> None:
    """The fake upstream's process: scripted by model name."""
    from moa.continuation import CONTINUE_INSTRUCTION
    from moa.testing import FakeOpenAIServer, Reply

    server = FakeOpenAIServer(chunk_size=CHUNK_CHARS)
    counts: dict[tuple[str, str], int] = {}
    lock = threading.Lock()

    def question(messages: list[dict[str, Any]]) -> str:
        users = [m["content"] for m in messages if m["role"] == "user"]
        users = [u for u in users if u != CONTINUE_INSTRUCTION]
        return str(users[-1]).rsplit("\n", 1)[-1]

    def respond(body: dict[str, Any], n: int) -> Reply:
        model, messages = body["model"], body["messages"]
        asked = question(messages)
        with lock:
            attempt = counts.get((asked, model), 0)
            counts[(asked, model)] = attempt + 1
        if model == "hung":
            return Reply(hang=600)
        if model != "agg":
            latency = _start_latency(f"{asked}|{model}|{attempt}")
            text = _answer(asked + model)
            if not body.get("stream"):  # a whole answer arrives when its last token is written
                latency += len(text) / CHARS_PER_TOKEN / TOKENS_PER_S
            return Reply(text=text, latency=latency, chunk_delay=CHUNK_DELAY)
        target = _answer(asked + "agg")
        partial = ""
        if messages[-1]["role"] == "assistant":
            partial = messages[-1]["content"]
        rest = target[len(partial) :] if target.startswith(partial) else target
        piece = rest[: body.get("max_tokens", ANSWER_TOKENS) * CHARS_PER_TOKEN]
        return Reply(
            text=piece,
            latency=AGGREGATOR_START_S,
            chunk_delay=CHUNK_DELAY,
            finish_reason="stop" if len(piece) == len(rest) else "length",
        )

    server.respond("*", respond)
    server.start()
    print(f"listening {server.base_url}", flush=True)
    try:
        while server._thread is not None and server._thread.is_alive():
            time.sleep(0.5)
    finally:
        server.stop()


@contextmanager
def upstream() -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening "):
            raise RuntimeError(f"the fake server did not start: {line!r}")
        yield line.split()[1]
    finally:
        process.terminate()
        process.wait(timeout=10)


def config(base_url: str, case: str, mode: str) -> Any:
    proposers: list[dict[str, Any]] = [{"model": f"p{i}"} for i in range(4)]
    if case == "straggler":
        proposers.append({"model": "hung"})
    if mode in ("hedge", "all"):
        proposers = [{**p, "hedge_after": HEDGE_AFTER_S} for p in proposers]
    aggregator: dict[str, Any] = {"model": "agg", "max_tokens": ANSWER_TOKENS}
    if mode in ("staircase", "all"):
        aggregator["mode"] = "staircase"
    return parse_config(
        {
            "providers": {"fake": {"base_url": base_url, "continuation": "prefill"}},
            "proposers": proposers,
            "aggregator": aggregator,
            "max_tokens": ANSWER_TOKENS,
            "timeout": 20,
            "max_attempts": 1,
            "wait": "cutoff" if mode in ("cut-off", "all") else "all",
        }
    )


async def measure(base_url: str, case: str, mode: str, runs: int) -> dict[str, list[float]]:
    async with MoA.from_config(config(base_url, case, mode)) as moa:

        async def one(k: int) -> tuple[float, float, int]:
            started = time.perf_counter()
            result = await moa.arun(f"question {k}")
            assert result.ttft_s is not None
            cut = sum(a.status == "cancelled" for layer in result.layers for a in layer.agents)
            return result.ttft_s, time.perf_counter() - started, cut

        outcomes = await asyncio.gather(*(one(k) for k in range(runs)))
    return {
        "ttft": [o[0] for o in outcomes],
        "total": [o[1] for o in outcomes],
        "cut": [float(o[2]) for o in outcomes],
    }


def embedded(count: int) -> None:
    from moa.evaluation.accuracy import mcnemar_exact
    from moa.evaluation.scoring import is_correct

    rows = [
        json.loads(line)
        for line in (Path(__file__).parent / "data" / "quality.jsonl").read_text().splitlines()
        if line.strip()
    ]
    rows = rows[:: max(1, len(rows) // count)][:count]
    print(f"embedded model, {len(rows)} questions of the quality set, one at a time")
    figures: dict[str, tuple[list[float], list[float], list[bool]]] = {}
    for mode in ("wait", "staircase"):
        # Seeded proposers and a greedy aggregator: both modes see the same candidates, so
        # the comparison is paired and only the aggregator's way of reading them differs.
        data: dict[str, Any] = {
            "providers": {"local": {"type": "llama-cpp"}},
            "proposers": [
                {"temperature": 0.0},
                {"temperature": 0.7, "seed": 1},
                {"temperature": 0.7, "seed": 2},
            ],
            "aggregator": {"temperature": 0.0, "mode": mode},
            "max_tokens": 64,
            "timeout": 600,
        }
        ttfts, totals, right = [], [], []
        with MoA.from_config(parse_config(data)) as moa:
            moa.run("Say hello.")  # load the model
            for row in rows:
                started = time.perf_counter()
                result = moa.run(row["instruction"])
                totals.append(time.perf_counter() - started)
                ttfts.append(result.ttft_s or totals[-1])
                right.append(is_correct(result.output, row["answers"], question=row["instruction"]))
                print(
                    f"  {mode} {len(right)}/{len(rows)}: TTFT {ttfts[-1]:.2f} s, "
                    f"total {totals[-1]:.2f} s, {'right' if right[-1] else 'wrong'}",
                    file=sys.stderr,
                    flush=True,
                )
        figures[mode] = (ttfts, totals, right)
    base_ttft, base_total, base_right = figures["wait"]
    for mode, (ttfts, totals, right) in figures.items():
        accuracy = sum(right) / len(right)
        error = math.sqrt(accuracy * (1 - accuracy) / len(right))
        print(
            f"{mode:>10}: TTFT p50 {pct(ttfts, 0.5):.2f} s "
            f"({pct(ttfts, 0.5) / pct(base_ttft, 0.5):.2f} x wait), "
            f"total p50 {pct(totals, 0.5):.2f} s "
            f"({pct(totals, 0.5) / pct(base_total, 0.5):.2f} x wait), "
            f"accuracy {100 * accuracy:.1f} % ± {100 * error:.1f}"
        )
    right = figures["staircase"][2]
    gained = sum(s and not w for s, w in zip(right, base_right, strict=True))
    lost = sum(w and not s for s, w in zip(right, base_right, strict=True))
    diffs = [float(s) - float(w) for s, w in zip(right, base_right, strict=True)]
    paired_se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    print(
        f"staircase - wait: {100 * statistics.mean(diffs):+.1f} ± {100 * paired_se:.1f} points "
        f"(paired SE), {gained} gained, {lost} lost, McNemar p = {mcnemar_exact(gained, lost):.2f}"
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=8, help="questions per mode, run at once")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--embedded", type=int, metavar="N", help="the embedded-model run instead")
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    if args.embedded:
        embedded(args.embedded)
        return
    modes = [m for m in args.modes.split(",") if m]
    if "wait-all" not in modes:
        modes.insert(0, "wait-all")
    print(
        f"{TOKENS_PER_S} tokens/s, {ANSWER_TOKENS}-token answers, start latency log-normal "
        f"(median 0.4 s, sigma 1), {args.runs} questions per mode at once"
    )
    with upstream() as base_url:
        for case in args.cases.split(","):
            figures = {m: asyncio.run(measure(base_url, case, m, args.runs)) for m in modes}
            base = figures["wait-all"]
            print(f"\ncase {case}")
            print(
                f"{'mode':>10} | {'TTFT p50':>9} {'ratio':>6} | {'TTFT p95':>9} {'ratio':>6} | "
                f"{'total p50':>9} {'ratio':>6} | {'total p95':>9} {'ratio':>6} | cut/run"
            )
            for mode, got in figures.items():
                cells = []
                for key in ("ttft", "total"):
                    for q in (0.5, 0.95):
                        value = pct(got[key], q)
                        cells.append(f"{value:8.2f}s {value / pct(base[key], q):6.2f}")
                cut = statistics.mean(got["cut"])
                print(f"{mode:>10} | " + " | ".join(cells) + f" | {cut:.2f}")


if __name__ == "__main__":
    main()
