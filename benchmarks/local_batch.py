"""Batched decoding on the embedded model: what decoding calls together buys, against its bound.

    python benchmarks/local_batch.py             # all four parts (about 10 minutes on 2 idle cores)
    python benchmarks/local_batch.py --parts limit,decode --rounds 1

Four parts, in one run, so that every ratio compares figures taken under the same load:

1. limit: one sequence, k tokens evaluated per llama_decode step (k = 1…8, logits for all k).
   A step's cost grows slower than k (the weights are read once per step), and k sequences
   decoding together cost at least what k tokens of one sequence cost: the bound for part 2.
2. decode: n = 1, 2, 3, 4, 6 requests sent at once to the provider (they decode as one batch)
   against the same requests one after another; aggregate tokens/s = answer tokens / wall time.
   Target: the batched rate at least 90% of the limit at k = n.
3. preset: the `local` preset's candidate layer (7 answers) per question, with the provider's
   `parallel` 8 (one batch) and 1 (one call at a time, as before batching); seeds are set, so
   both give the same answers (checked). Target: at most 0.6x the sequential time.
4. serve: `moa serve` on the `local` preset with 4 concurrent streaming clients, time to first
   token p50/p95, `parallel` 8 against 1.

Prints the uptime load average at the start and end: on a shared machine the figures are only
as good as the quiet they were taken in.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _process import ready_process

from moa import MoA, parse_config
from moa.presets import PRESETS
from moa.providers.base import ChatRequest
from moa.providers.llama_cpp import LlamaCppProvider, default_model_path
from moa.providers.llama_model import LlamaModel

_STORIES = ["a lighthouse", "a lost key", "a dragon", "a storm", "a train", "a garden"]
_QUESTIONS = [
    "What is 7 + 5?",
    "What is the capital of Japan?",
    "Why do we have seasons?",
    "How many legs does a spider have?",
]


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- 1. the limit ----------------------------------------------------------------------------


def limit(rounds: int, threads: int) -> dict[int, float]:
    """Tokens/s when one sequence evaluates k tokens per step; median of `rounds`."""
    model = LlamaModel(default_model_path(), n_ctx=512, n_seq=1, n_batch=512, n_threads=threads)
    prompt = model.tokenize("Once upon a time, " * 40, add_bos=False, special=False)[:480]
    rates: dict[int, list[float]] = {k: [] for k in range(1, 9)}
    try:
        for _ in range(rounds):
            for k in rates:
                model.clear()
                tokens = 96 // k * k
                started = time.perf_counter()
                for position in range(0, tokens, k):
                    model.clear_batch()
                    for j in range(k):
                        model.add(prompt[position + j], position + j, 0, logits=True)
                    assert model.decode() == 0
                rates[k].append(tokens / (time.perf_counter() - started))
    finally:
        model.close()
    return {k: statistics.median(v) for k, v in rates.items()}


# --- 2. decode throughput ----------------------------------------------------------------------


def _story(n: int) -> ChatRequest:
    topic = _STORIES[n % len(_STORIES)]
    return ChatRequest(
        model="smollm2",
        messages=[{"role": "user", "content": f"Write a long story about {topic}."}],
        temperature=0.7,
        seed=n,
        max_tokens=64,
    )


async def _tokens(provider: LlamaCppProvider, request: ChatRequest) -> tuple[int, float, float]:
    """Answer tokens, and when the first and the last came (perf_counter seconds)."""
    # The stream itself: complete() would stop an answer that starts to loop.
    tokens, first, last = 0, 0.0, 0.0
    async for chunk in provider.stream(request):
        last = time.perf_counter()
        first = first or last
        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
    return tokens, first, last


def decode(counts: list[int], rounds: int, threads: int) -> dict[int, list[float]]:
    """For n requests at once and one after another: aggregate answer tokens/s over the whole
    time (prompts included), and decode-only (from the last first token to the last token,
    one after another: the sum of each answer's first-to-last time); medians of `rounds`."""

    async def run() -> dict[int, list[float]]:
        provider = LlamaCppProvider("local", n_ctx=512, parallel=8, n_threads=threads)
        await _tokens(provider, _story(99))  # load the model and warm up
        results: dict[int, list[list[float]]] = {n: [[], [], [], []] for n in counts}
        try:
            for _ in range(rounds):
                for n in counts:
                    requests = [_story(i) for i in range(n)]
                    started = time.perf_counter()
                    together = await asyncio.gather(*(_tokens(provider, r) for r in requests))
                    tokens = sum(t for t, _, _ in together)
                    results[n][0].append(tokens / (time.perf_counter() - started))
                    first, last = max(f for _, f, _ in together), max(e for _, _, e in together)
                    results[n][1].append((tokens - n) / (last - first))
                    started = time.perf_counter()
                    alone = [await _tokens(provider, r) for r in requests]
                    tokens = sum(t for t, _, _ in alone)
                    results[n][2].append(tokens / (time.perf_counter() - started))
                    results[n][3].append((tokens - n) / sum(e - f for _, f, e in alone))
        finally:
            await provider.aclose()
        return {n: [statistics.median(v) for v in found] for n, found in results.items()}

    return asyncio.run(run())


# --- 3. the local preset -----------------------------------------------------------------------


def _preset(parallel: int, threads: int) -> dict[str, Any]:
    data: dict[str, Any] = copy.deepcopy(PRESETS["local"])
    data["providers"]["local"].update(parallel=parallel, n_threads=threads)
    for offset, agent in enumerate(data["proposers"]):
        agent["seed"] = 1000 + offset  # reproducible: both modes must give the same answers
    return data


def preset(questions: list[str], threads: int) -> dict[int, list[tuple[float, float, str]]]:
    """Per question: (candidate layer seconds, whole run seconds, answer), parallel 8 and 1."""
    timings: dict[int, list[tuple[float, float, str]]] = {}
    for parallel in (8, 1):
        with MoA.from_config(parse_config(_preset(parallel, threads))) as moa:
            moa.run("Hi")  # load the model
            runs = []
            for question in questions:
                started = time.perf_counter()
                result = moa.run(question)
                wall = time.perf_counter() - started
                runs.append((result.layers[0].latency_s, wall, result.output))
        timings[parallel] = runs
    return timings


# --- 4. moa serve --------------------------------------------------------------------------------


@contextmanager
def _serve(config: Path, workdir: Path) -> Iterator[str]:
    command = ["-m", "moa", "serve", "--config", str(config), "--port", "0"]
    # Loading the model takes a while on 2 busy cores: a longer wait than the default.
    with ready_process(command, workdir, "serve", r" at (http://\S+)/v1 ", start_timeout=120) as (
        url,
        _,
    ):
        yield url


async def _first_token_s(url: str, question: str) -> float:
    import httpx

    body = {"model": "moa", "messages": [{"role": "user", "content": question}], "stream": True}
    started = time.perf_counter()
    async with (
        httpx.AsyncClient(timeout=900) as http,
        http.stream("POST", f"{url}/v1/chat/completions", json=body) as response,
    ):
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"]))
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    return time.perf_counter() - started
    raise RuntimeError("the stream ended without text")


def serve(clients: int, requests: int, threads: int) -> dict[int, list[float]]:
    """Times to first token of `clients` users, each asking `requests` questions in turn."""

    async def users(url: str) -> list[float]:
        await _first_token_s(url, "Hi")  # load the model

        async def user(n: int) -> list[float]:
            return [
                await _first_token_s(url, _QUESTIONS[(n + i) % len(_QUESTIONS)])
                for i in range(requests)
            ]

        return [
            t for times in await asyncio.gather(*(user(n) for n in range(clients))) for t in times
        ]

    found: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="moa-local-batch-") as tmp:
        for parallel in (8, 1):
            config = Path(tmp) / f"local-{parallel}.yaml"
            config.write_text(json.dumps(_preset(parallel, threads)))  # JSON is YAML
            with _serve(config, Path(tmp)) as url:
                found[parallel] = asyncio.run(users(url))
    return found


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="limit,decode,preset,serve")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of parts 1-2 (median)")
    parser.add_argument("--questions", type=int, default=3, help="questions in part 3")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2, help="questions per client, part 4")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    print(f"load average at start: {_load()} ({os.cpu_count()} cores, {args.threads} threads)")

    bound: dict[int, float] = {}
    if "limit" in parts:
        bound = limit(args.rounds, args.threads)
        print("\n1. limit: one sequence, k tokens per step")
        print("| k | tokens/s | × k = 1 |\n|---|---|---|")
        for k, rate in bound.items():
            print(f"| {k} | {rate:.0f} | {rate / bound[1]:.2f} |")

    if "decode" in parts:
        rates = decode([1, 2, 3, 4, 6], args.rounds, args.threads)
        print("\n2. decode: n requests at once and one after another (answer tokens/s;")
        print("   whole: prompts included; decode: from every first token to the last)")
        print(
            "| n | batched, whole | sequential, whole | batched, decode | sequential, decode "
            "| speed-up (decode) | limit at k = n | batched decode / limit |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for n, (whole, batched, whole_alone, alone) in rates.items():
            at = bound.get(n)
            shown = f"{at:.0f} | {batched / at:.0%}" if at else "- | -"
            cells = f"{whole:.0f} | {whole_alone:.0f} | {batched:.0f} | {alone:.0f}"
            print(f"| {n} | {cells} | {batched / alone:.2f} | {shown} |")

    if "preset" in parts:
        questions = _QUESTIONS[: args.questions]
        timings = preset(questions, args.threads)
        print("\n3. the local preset, per question: candidate layer (7 answers) and whole run")
        print("| question | layer, batched | layer, sequential | ratio | same answer |")
        print("|---|---|---|---|---|")
        for question, fast, slow in zip(questions, timings[8], timings[1], strict=True):
            same = "yes" if fast[2] == slow[2] else "NO"
            ratio = fast[0] / slow[0]
            print(f"| {question} | {fast[0]:.1f} s | {slow[0]:.1f} s | {ratio:.2f} | {same} |")
        layer_fast = sum(r[0] for r in timings[8])
        layer_slow = sum(r[0] for r in timings[1])
        print(
            f"total: {layer_fast:.1f} s against {layer_slow:.1f} s = {layer_fast / layer_slow:.2f}x"
        )

    if "serve" in parts:
        found = serve(args.clients, args.requests, args.threads)
        print(f"\n4. moa serve --preset local, {args.clients} concurrent streaming clients")
        print("| parallel | requests | TTFT p50 | TTFT p95 |\n|---|---|---|---|")
        for parallel, times in found.items():
            p50, p95 = _pct(times, 0.5), _pct(times, 0.95)
            print(f"| {parallel} | {len(times)} | {p50:.1f} s | {p95:.1f} s |")

    print(f"\nload average at end: {_load()}")


if __name__ == "__main__":
    main()
