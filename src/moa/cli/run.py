"""`moa ask`, `moa chat` and `moa presets`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

import click
from rich.console import Console

from moa._text import describe_unencodable
from moa.cli.agent_text import AgentTextPrinter
from moa.cli.display import AgentStatusView
from moa.cli.options import environment, load_selected, pipeline_options
from moa.engine import MoA
from moa.errors import RunError
from moa.presets import PRESETS, preset_config, preset_description
from moa.providers.base import ChatMessage
from moa.results import Done, RunResult, TextDelta


def open_moa(
    config_path: Path | None, preset: str | None, pipeline: str | None, env_file: Path | None
) -> MoA:
    config, _ = load_selected(config_path, preset)
    return MoA.from_config(config, pipeline, env=environment(config, env_file))


async def answer(
    moa: MoA,
    messages: list[ChatMessage],
    *,
    show_text: bool,
    status: bool,
    show_agents: bool = False,
) -> RunResult:
    """Run once: live status on stderr if wanted, the answer streamed to stdout if wanted,
    and with `show_agents` every proposer's text on stderr as it streams.

    A run that fails raises RunError after anything already streamed has been flushed.
    """
    console = Console(stderr=True)
    view = AgentStatusView(console) if status else None
    printer = AgentTextPrinter(console) if show_agents else None
    wrote = False
    try:
        with view if view is not None else contextlib.nullcontext():
            async with contextlib.aclosing(moa.stream(messages, agent_text=show_agents)) as events:
                async for event in events:
                    if printer is not None:
                        printer.update(event)
                    if view is not None:
                        view.update(event)
                    if isinstance(event, TextDelta) and show_text:
                        sys.stdout.write(event.text)
                        sys.stdout.flush()
                        wrote = True
                    elif isinstance(event, Done):
                        return event.result
    finally:
        if wrote:
            sys.stdout.write("\n")
            sys.stdout.flush()
    raise RunError("the run ended without a result")  # pragma: no cover


def read_stdin_text() -> str:
    """All of standard input as text; bytes that are not UTF-8 are kept as surrogates, which
    the run refuses with one line naming them (see `moa._text`), never a traceback."""
    return sys.stdin.buffer.read().decode("utf-8", "surrogateescape")


def _read_line() -> str:
    return sys.stdin.buffer.readline().decode("utf-8", "surrogateescape")


@click.command()
@click.argument("prompt")
@pipeline_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object with every agent's output at the end.",
)
@click.option(
    "--show-agents",
    is_flag=True,
    help="Stream every proposer's text to stderr as it arrives, each line labelled.",
)
def ask(
    prompt: str,
    config_path: Path | None,
    preset: str | None,
    pipeline: str | None,
    env_file: Path | None,
    as_json: bool,
    show_agents: bool,
) -> None:
    """Answer PROMPT with a MoA pipeline (PROMPT '-' reads standard input)."""
    if prompt == "-":
        prompt = read_stdin_text()
    if not prompt.strip():
        raise click.UsageError("the prompt is empty")
    moa = open_moa(config_path, preset, pipeline, env_file)
    status = sys.stderr.isatty() and not as_json

    async def go() -> RunResult:
        async with moa:
            return await answer(
                moa,
                [{"role": "user", "content": prompt}],
                show_text=not as_json,
                status=status,
                show_agents=show_agents,
            )

    try:
        result = asyncio.run(go())
    except RunError as error:
        if as_json and error.result is not None:
            click.echo(json.dumps(error.result.to_dict(), ensure_ascii=False, indent=2))
        raise
    if as_json:
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))


@click.command()
@pipeline_options
def chat(
    config_path: Path | None, preset: str | None, pipeline: str | None, env_file: Path | None
) -> None:
    """A multi-turn conversation. /exit or end-of-file ends it; /reset forgets the history."""
    moa = open_moa(config_path, preset, pipeline, env_file)
    interactive = sys.stdin.isatty()
    status = sys.stderr.isatty()
    if interactive:
        click.echo(
            f"moa chat with {moa.name} ({moa.pipeline.total_layers} layers, "
            f"{moa.pipeline.call_count} calls per turn). /exit to quit.",
            err=True,
        )

    async def go() -> None:
        history: list[ChatMessage] = []
        loop = asyncio.get_running_loop()
        async with moa:
            while True:
                if interactive:
                    sys.stderr.write("you> ")
                    sys.stderr.flush()
                line = await loop.run_in_executor(None, _read_line)
                if not line:
                    return
                text = line.strip()
                if not text:
                    continue
                if text in ("/exit", "/quit"):
                    return
                if text == "/reset":
                    history.clear()
                    click.echo("(history cleared)", err=True)
                    continue
                problem = describe_unencodable(text)
                if problem is not None:
                    click.echo(f"error: that line has {problem}; type it again", err=True)
                    continue
                turn: list[ChatMessage] = [*history, {"role": "user", "content": text}]
                try:
                    result = await answer(moa, turn, show_text=True, status=status)
                except RunError as error:
                    click.echo(f"error: {error}", err=True)
                    continue
                history = [*turn, {"role": "assistant", "content": result.output}]

    asyncio.run(go())


@click.command()
def presets() -> None:
    """List the presets and their agents."""
    for name in PRESETS:
        pipeline = preset_config(name).resolve()
        proposers = pipeline.layers[0].agents if pipeline.layers else ()
        click.secho(name, bold=True, nl=False)
        click.echo(f"  {preset_description(name)}")
        click.echo(
            f"  layers: {pipeline.total_layers}  "
            f"({len(proposers)} proposers per layer, {pipeline.call_count} calls per question)"
        )
        for agent in proposers:
            click.echo(
                f"  proposer:   {agent.provider}/{agent.model}  temperature={agent.temperature:g}"
            )
        click.echo(f"  aggregator: {pipeline.aggregator.provider}/{pipeline.aggregator.model}\n")
