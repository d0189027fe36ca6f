"""Client CPU per chat-completions call, for each candidate HTTP client, under the same load.

    python benchmarks/http_clients.py                      # 2,000 calls, 64 at once, 100 ms
    python benchmarks/http_clients.py --calls 4000 --repeat 3

The fake OpenAI-compatible server runs as its own process; this process makes `--calls` POSTs
to /v1/chat/completions, `--concurrency` at a time, through each client in turn (non-streamed,
then streamed with `stream_options.include_usage`), and reports the CPU time this process spent
(user + system, `time.process_time`) divided by the calls. A warm-up of `--concurrency` calls
comes first, so connection set-up is not counted. Clients that are not installed are skipped.

`moa-provider` is the package's own OpenAI-compatible provider (whatever HTTP path it uses), so
the figure before and after a change to it is measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fake_upstream import fake_upstream

Call = Callable[[int], Awaitable[str]]
MESSAGES = [{"role": "user", "content": "Benchmark question about the weather in spring."}]


def body(n: int, stream: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": f"m{n % 3}", "messages": MESSAGES, "temperature": 0.7}
    if stream:
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
    return payload


async def measure(
    make: Callable[[], Awaitable[tuple[Call, Callable[[], Awaitable[None]]]]],
    calls: int,
    concurrency: int,
) -> float:
    call, close = await make()
    try:
        await asyncio.gather(*(call(n) for n in range(concurrency)))  # warm-up: open connections
        queue = iter(range(calls))

        async def worker() -> None:
            for n in queue:
                text = await call(n)
                assert text, "empty answer"

        started = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return (time.process_time() - started) / calls
    finally:
        await close()


def candidates(base_url: str, stream: bool) -> dict[str, Any]:
    url = f"{base_url}/chat/completions"
    found: dict[str, Any] = {}

    try:
        import openai
    except ImportError:
        pass
    else:

        async def make_openai() -> tuple[Call, Any]:
            from openai.types.chat import ChatCompletion, ChatCompletionChunk

            client = openai.AsyncOpenAI(api_key="x", base_url=base_url, max_retries=0)

            async def call(n: int) -> str:
                if not stream:
                    raw = await client.post(
                        "/chat/completions", cast_to=bytes, body=body(n, False), options={}
                    )
                    return str(json.loads(raw)["choices"][0]["message"]["content"])
                chunks = await client.post(
                    "/chat/completions",
                    cast_to=ChatCompletion,
                    body=body(n, True),
                    options={},
                    stream=True,
                    stream_cls=openai.AsyncStream[ChatCompletionChunk],
                )
                text = []
                async for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        text.append(chunk.choices[0].delta.content)
                return "".join(text)

            return call, client.close

        found[f"openai {openai.__version__} (client.post)"] = make_openai

    for module_name in ("httpx", "httpx2"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        sse: Any = None
        if module_name == "httpx":
            try:
                import httpx_sse as sse
            except ImportError:
                sse = None
        if stream and sse is None:
            continue

        def make_httpx(module: Any = module, sse: Any = sse) -> Any:
            async def make() -> tuple[Call, Any]:
                limits = module.Limits(max_connections=None, max_keepalive_connections=None)
                client = module.AsyncClient(limits=limits, timeout=60)

                async def call(n: int) -> str:
                    if not stream:
                        response = await client.post(url, json=body(n, False))
                        response.raise_for_status()
                        return str(json.loads(response.content)["choices"][0]["message"]["content"])
                    text = []
                    async with sse.aconnect_sse(client, "POST", url, json=body(n, True)) as source:
                        async for event in source.aiter_sse():
                            if event.data == "[DONE]":
                                break
                            chunk = json.loads(event.data)
                            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                                text.append(chunk["choices"][0]["delta"]["content"])
                    return "".join(text)

                return call, client.aclose

            return make

        found[f"{module_name} {module.__version__}" + (" + httpx-sse" if stream else "")] = (
            make_httpx()
        )

    try:
        import aiohttp
    except ImportError:
        pass
    else:

        async def make_aiohttp() -> tuple[Call, Any]:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
            )

            async def call(n: int) -> str:
                async with session.post(url, json=body(n, stream)) as response:
                    response.raise_for_status()
                    if not stream:
                        data = json.loads(await response.read())
                        return str(data["choices"][0]["message"]["content"])
                    text = []
                    async for line in response.content:  # line-splitting only, for the figure
                        if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
                            chunk = json.loads(line[6:])
                            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                                text.append(chunk["choices"][0]["delta"]["content"])
                    return "".join(text)

            return call, session.close

        found[f"aiohttp {aiohttp.__version__}" + (" (line split)" if stream else "")] = make_aiohttp

    try:
        from moa.providers.base import ChatRequest
        from moa.providers.openai_compat import OpenAICompatibleProvider
    except ImportError:
        pass
    else:

        async def make_moa() -> tuple[Call, Any]:
            provider = OpenAICompatibleProvider("bench", base_url=base_url, api_key="x")

            async def call(n: int) -> str:
                request = ChatRequest(
                    model=f"m{n % 3}",
                    messages=MESSAGES,
                    temperature=0.7,  # type: ignore[arg-type]
                )
                if not stream:
                    return (await provider.complete(request)).text
                return "".join([chunk.text async for chunk in provider.stream(request)])

            return call, provider.aclose

        found["moa-provider"] = make_moa
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=3, help="runs per client; min and max shown")
    parser.add_argument("--only", default="", help="run the clients whose name contains this")
    parser.add_argument("--no-stream", action="store_true")
    args = parser.parse_args()
    with fake_upstream("--port", "0", "--latency", str(args.latency)) as base_url:
        print(
            f"{args.calls} calls, {args.concurrency} at once, {args.latency * 1000:.0f} ms "
            f"upstream; client CPU per call (ms), median [min-max] of {args.repeat} runs"
        )
        for stream in (False,) if args.no_stream else (False, True):
            for name, make in candidates(base_url, stream).items():
                if args.only not in name:
                    continue
                runs = [
                    asyncio.run(measure(make, args.calls, args.concurrency)) * 1000
                    for _ in range(args.repeat)
                ]
                kind = "stream" if stream else "whole "
                print(
                    f"  {kind}  {name:40s} {statistics.median(runs):6.2f}  "
                    f"[{min(runs):.2f}-{max(runs):.2f}]",
                    flush=True,
                )


if __name__ == "__main__":
    main()
