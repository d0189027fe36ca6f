"""`moa mcp` as MCP clients run it: a real subprocess over stdio, driven by the official `mcp`
SDK's own client, with the fake OpenAI server upstream."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client

from moa.testing import FakeOpenAIServer, Reply


@pytest.fixture
def config(fake: FakeOpenAIServer, tmp_path: Path) -> Path:
    path = tmp_path / "moa.yaml"
    path.write_text(
        f"""
providers:
  fake: {{base_url: "{fake.base_url}"}}
max_attempts: 1
pipelines:
  duo:
    proposers: [{{model: p1}}, {{model: p2}}]
    aggregator: {{model: agg}}
  deep:
    layers: 3
    proposers: [{{model: p1}}]
    aggregator: {{model: agg}}
"""
    )
    return path


@asynccontextmanager
async def connect(*args: str) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "moa", "mcp", *args], env=dict(os.environ)
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


def test_tools_list_and_pipelines(config: Path) -> None:
    async def main() -> None:
        async with connect("--config", str(config)) as session:
            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert set(tools) == {"ask", "list_pipelines"}
            assert set(tools["ask"].input_schema["properties"]) == {"prompt", "pipeline"}
            assert tools["ask"].input_schema["required"] == ["prompt"]
            listed = await session.call_tool("list_pipelines", {})
            pipelines = json.loads(listed.content[0].text)  # type: ignore[union-attr]
            assert [p["name"] for p in pipelines] == ["duo", "deep"]
            assert pipelines[0]["layers"] == [["fake/p1", "fake/p2"]]
            assert pipelines[1]["calls"] == 3
            resource = await session.read_resource("moa://pipelines")
            assert json.loads(resource.contents[0].text) == pipelines  # type: ignore[union-attr]

    asyncio.run(main())


def test_ask_answers_with_a_summary_and_reports_progress(
    fake: FakeOpenAIServer, config: Path
) -> None:
    fake.script("agg", Reply(text="Mercury is closest to the Sun."))
    reports: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append((progress, total, message))

    async def main() -> None:
        async with connect("--config", str(config)) as session:
            result = await session.call_tool(
                "ask",
                {"prompt": "Which planet is closest to the Sun?", "pipeline": "deep"},
                progress_callback=on_progress,
            )
            assert not result.is_error
            answer, summary = (c.text for c in result.content)  # type: ignore[union-attr]
            assert answer == "Mercury is closest to the Sun."
            assert "layer 1: fake/p1 ok" in summary
            assert "layer 3: fake/agg ok" in summary
            assert result.structured_content is not None
            agents = result.structured_content["agents"]
            assert [(a["layer"], a["model"], a["status"]) for a in agents] == [
                (1, "fake/p1", "ok"),
                (2, "fake/p1", "ok"),
                (3, "fake/agg", "ok"),
            ]

    asyncio.run(main())
    assert [(done, total) for done, total, _ in reports] == [(1, 3), (2, 3), (3, 3)]
    assert reports[0][2] is not None and reports[0][2].startswith("layer 1: fake/p1 ok")


def test_a_failed_run_or_unknown_pipeline_is_a_tool_error(
    fake: FakeOpenAIServer, config: Path
) -> None:
    fake.script("p1", Reply(status=400))
    fake.script("p2", Reply(status=401))

    async def main() -> None:
        async with connect("--config", str(config)) as session:
            failed = await session.call_tool("ask", {"prompt": "hi", "pipeline": "duo"})
            assert failed.is_error
            text = failed.content[0].text  # type: ignore[union-attr]
            assert text.startswith("the pipeline 'duo' failed: layer 1")
            assert "fake/p2 failed" in text
            unknown = await session.call_tool("ask", {"prompt": "hi", "pipeline": "trio"})
            assert unknown.is_error
            assert unknown.content[0].text == (  # type: ignore[union-attr]
                "no pipeline named 'trio'; this server runs: duo, deep"
            )
            # The server is still there after both.
            fine = await session.call_tool("ask", {"prompt": "hi", "pipeline": "deep"})
            assert not fine.is_error

    asyncio.run(main())


def test_cancelling_the_call_cancels_every_upstream_call(
    fake: FakeOpenAIServer, config: Path
) -> None:
    fake.script("p1", Reply(hang=60))
    fake.script("p2", Reply(hang=60))

    async def main() -> None:
        async with connect("--config", str(config)) as session:
            call = asyncio.create_task(
                session.call_tool("ask", {"prompt": "slow one", "pipeline": "duo"})
            )
            deadline = time.monotonic() + 30
            while len(fake.requests) < 2:
                assert time.monotonic() < deadline, "the upstream calls never started"
                await asyncio.sleep(0.05)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            while not all(r.disconnected for r in fake.requests):
                assert time.monotonic() < deadline, "an upstream call was left running"
                await asyncio.sleep(0.05)
            # The session goes on: the next call is served.
            fake.reset()
            again = await session.call_tool("list_pipelines", {})
            assert not again.is_error

    asyncio.run(main())
    assert not fake.requests_for("agg")


def test_a_bad_config_is_one_error_line(tmp_path: Path) -> None:
    import subprocess

    broken = tmp_path / "broken.yaml"
    broken.write_text("pipelines: {a: {layers: 0}}\n")
    done = subprocess.run(
        [sys.executable, "-m", "moa", "mcp", "--config", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and "aggregator: required" in line


def test_streamable_http_serves_the_same_tools(fake: FakeOpenAIServer, config: Path) -> None:
    import socket
    import subprocess

    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moa",
            "mcp",
            "--config",
            str(config),
            "--http",
            "--port",
            f"{port}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/mcp"

    async def main() -> None:
        async with (
            streamable_http_client(url) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            result = await session.call_tool("ask", {"prompt": "hi"})
            assert not result.is_error
            assert result.content[0].text == "agg answer 0"  # type: ignore[union-attr]

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx2.get(url, timeout=1)
                break
            except httpx2.TransportError:
                assert process.poll() is None, "moa mcp --http exited"
                assert time.monotonic() < deadline, "moa mcp --http did not start"
                time.sleep(0.2)
        asyncio.run(main())
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert sorted(r.model for r in fake.requests) == ["agg", "p1", "p2"]


def test_http_on_a_public_address_needs_allow_unauthenticated(config: Path) -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "moa", "mcp", "-c", str(config), "--http", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and "--allow-unauthenticated" in line
