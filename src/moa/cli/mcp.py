"""`moa mcp`: serve pipelines to MCP clients over stdio, or streamable HTTP with --http."""

from __future__ import annotations

from pathlib import Path

import click

from moa.cli.options import environment, load_selected
from moa.engine import open_pipelines

# moa.mcp_server needs the [mcp] extra: it is imported when the command runs.


@click.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A YAML config file; each of its pipelines can be asked (a single pipeline is 'moa').",
)
@click.option("-p", "--preset", help="A preset to serve (default: the local preset).")
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A .env file to read API keys from.",
)
@click.option("--http", is_flag=True, help="Serve streamable HTTP at http://HOST:PORT/mcp.")
@click.option("--host", default="127.0.0.1", show_default=True, help="With --http: the address.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="With --http."
)
@click.option(
    "--allow-unauthenticated",
    is_flag=True,
    help="With --http: listen on a non-loopback address although MCP clients are not "
    "authenticated (only behind something that checks them).",
)
def command(
    config_path: Path | None,
    preset: str | None,
    env_file: Path | None,
    http: bool,
    host: str,
    port: int,
    allow_unauthenticated: bool,
) -> None:
    """Serve MoA pipelines as a tool for MCP clients (coding assistants, agent frameworks).

    The tool `ask` runs a pipeline on a prompt; `list_pipelines` shows them. Over stdio (the
    default) the client starts this command itself; see the README for a client snippet.
    """
    from moa.mcp_server import run_server

    config, name = load_selected(config_path, preset)
    env = environment(config, env_file)
    if http:
        from moa.server.runner import check_exposure

        check_exposure(host, (), allow_unauthenticated)
    pipelines = open_pipelines(config, env=env)
    if config.pipelines is None and name != "moa":  # a preset: asked by its own name
        moa = pipelines.pop("moa")
        moa.name = name
        pipelines[name] = moa
    run_server(pipelines, http=http, host=host, port=port)
