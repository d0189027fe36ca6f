"""`moa mcp`: serve pipelines to MCP clients over stdio, or streamable HTTP with --http."""

from __future__ import annotations

from pathlib import Path

import click

from moa.cli.options import environment, load_selected, serving_options
from moa.engine import open_pipelines

# moa.mcp_server needs the [mcp] extra: it is imported when the command runs.


@click.command()
@serving_options(
    "A YAML config file; each of its pipelines can be asked (a single one is 'moa').",
    "A preset to serve (default: the local preset).",
    "A .env file to read API keys from.",
    only="With --http",
    clients="MCP clients",
)
@click.option("--http", is_flag=True, help="Serve streamable HTTP at http://HOST:PORT/mcp.")
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

    config, _ = load_selected(config_path, preset)
    env = environment(config, env_file)
    if http:
        from moa.server.runner import check_exposure

        check_exposure(host, (), allow_unauthenticated)
    pipelines = open_pipelines(config, env=env)
    run_server(pipelines, http=http, host=host, port=port)
