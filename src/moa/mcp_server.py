"""`moa mcp`: MoA pipelines as a tool for MCP clients (the [mcp] extra, the official SDK).

Tools:
    ask(prompt, pipeline=None)   run a pipeline; the answer, then one line per agent call
                                 (model, status, latency). Progress is reported as agents
                                 finish; cancelling the call cancels every upstream call; a
                                 failed run is a tool error (isError) saying why, not a crash.
    list_pipelines()             the pipelines this server runs, with their agents
Resource:
    moa://pipelines              the same listing, as JSON
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

try:
    import anyio
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.types import CallToolResult, TextContent
except ImportError:  # pragma: no cover - exercised only without the extra
    from moa.errors import MissingExtraError

    raise MissingExtraError("moa mcp", "mcp", "mcp") from None

from moa._version import __version__
from moa.engine import MoA, close_providers
from moa.errors import InvalidRequest, RunError
from moa.results import AgentFinished, AgentResult, Done, RunResult

__all__ = ["build_server", "run_server"]

_INSTRUCTIONS = (
    "Ask a Mixture-of-Agents pipeline: several models answer, and an aggregator writes one "
    "better answer from theirs. Use `ask` for questions that deserve more than one model's "
    "view; it is slower and costs more than a single call."
)


def build_server(pipelines: Mapping[str, MoA]) -> MCPServer:
    """An MCP server over `pipelines`; `ask` without a pipeline uses the first."""
    if not pipelines:
        raise ValueError("build_server needs at least one pipeline")
    default = next(iter(pipelines))
    server: MCPServer = MCPServer(name="moa", instructions=_INSTRUCTIONS, version=__version__)

    @server.tool(
        name="ask",
        description="Ask a Mixture-of-Agents pipeline and get its answer, followed by a "
        f"summary of each agent call. Pipelines: {', '.join(pipelines)} (default: {default}).",
    )
    async def ask(prompt: str, ctx: Context, pipeline: str | None = None) -> CallToolResult:
        name = pipeline or default
        moa = pipelines.get(name)
        if moa is None:
            return _error(f"no pipeline named {name!r}; this server runs: {', '.join(pipelines)}")
        total = moa.pipeline.call_count
        finished = 0
        try:
            async with contextlib.aclosing(moa.stream(prompt)) as events:
                async for event in events:
                    if isinstance(event, AgentFinished):
                        finished += 1
                        await ctx.report_progress(
                            finished, max(total, finished), _line(event.result)
                        )
                    elif isinstance(event, Done):
                        return _answer(name, event.result)
        except InvalidRequest as error:
            return _error(f"invalid prompt: {error}")
        except RunError as error:
            summary = _summary(error.result) if error.result is not None else ""
            return _error(f"the pipeline {name!r} failed: {error}" + summary)
        return _error("the run ended without an answer")  # pragma: no cover

    @server.tool(name="list_pipelines", description="The pipelines `ask` can run.")
    def list_pipelines() -> str:
        return json.dumps(_listing(pipelines, default), indent=2)

    @server.resource("moa://pipelines", name="pipelines", mime_type="application/json")
    def pipelines_resource() -> str:
        return json.dumps(_listing(pipelines, default), indent=2)

    return server


def _listing(pipelines: Mapping[str, MoA], default: str) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "default": name == default,
            "layers": [
                [f"{a.provider}/{a.model}" for a in layer.agents] for layer in moa.pipeline.layers
            ],
            "aggregator": f"{moa.pipeline.aggregator.provider}/{moa.pipeline.aggregator.model}",
            "calls": moa.pipeline.call_count,
        }
        for name, moa in pipelines.items()
    ]


def _line(result: AgentResult) -> str:
    line = f"layer {result.layer}: {result.provider}/{result.model} {result.status}"
    line += f" in {result.latency_s:.2f} s"
    if result.error and result.status != "ok":
        line += f" ({result.error})"
    return line


def _summary(result: RunResult) -> str:
    lines = [_line(call) for call in result.calls]
    return "\n\nAgents:\n" + "\n".join(f"- {line}" for line in lines)


def _answer(name: str, result: RunResult) -> CallToolResult:
    usage = result.usage
    return CallToolResult(
        content=[
            TextContent(type="text", text=result.output),
            TextContent(
                type="text",
                text=f"pipeline {name}, {result.latency_s:.2f} s, "
                f"{usage.total_tokens} tokens" + _summary(result),
            ),
        ],
        structured_content={
            "answer": result.output,
            "pipeline": name,
            "latency_s": round(result.latency_s, 3),
            "usage": usage.to_dict(),
            "agents": result.call_summaries(),
        },
    )


def _error(message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)


def run_server(
    pipelines: Mapping[str, MoA],
    *,
    http: bool = False,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> None:
    """Serve over stdio (or streamable HTTP at http://HOST:PORT/mcp) until the client or a
    signal ends it; then close the providers. Takes ownership of the pipelines."""
    server = build_server(pipelines)

    async def main() -> None:
        try:
            if http:
                await server.run_streamable_http_async(host=host, port=port)
            else:
                await server.run_stdio_async()
        finally:
            with anyio.CancelScope(shield=True):
                await close_providers(pipelines)

    anyio.run(main)
