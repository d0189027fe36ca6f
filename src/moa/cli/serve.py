"""`moa serve`: every pipeline of a config as a model of an OpenAI-compatible API."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import click

from moa.cli.options import environment, load_selected, serving_options
from moa.engine import open_pipelines

# The server modules need the [server] extra: they are imported when the command runs, so the
# rest of the CLI works without it.

_MIB = 1024 * 1024


@click.command()
@serving_options(
    "A YAML config file. Each pipeline under 'pipelines:' is a model of that name; a single "
    "pipeline is the model 'moa'.",
    "A preset, served as a model of its name (default: the local preset).",
    "A .env file to read API keys (and MOA_API_KEYS) from.",
    clients="clients (MOA_API_KEYS)",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Runs at once; more requests get 429 with Retry-After.",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1),
    default=_MIB,
    show_default=True,
    help="Largest request body; larger ones get 413.",
)
@click.option(
    "--grace-period",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds runs in flight may take to finish after SIGTERM.",
)
@click.option("--no-ui", is_flag=True, help="Do not serve the web page at http://HOST:PORT/.")
@click.option(
    "--metrics",
    is_flag=True,
    help="Serve Prometheus metrics at /metrics (needs the [metrics] extra), behind the same API "
    "keys as /v1.",
)
@click.option(
    "--metrics-public", is_flag=True, help="With --metrics: serve /metrics without a key."
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    metavar="ORIGIN",
    help="Let browser pages from ORIGIN (e.g. http://localhost:3000, or '*') call the API; "
    "repeatable. None by default.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds a client has to send a request's headers (from connecting, or from the "
    "previous response); slower connections are closed.",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds a client has to send a request's body; slower ones get 408.",
)
@click.option(
    "--max-client-connections",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="Connections one client address may hold at once; more get 429. 0: no cap (behind "
    "a proxy that makes every client one address).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Server processes sharing the port, to use more than one core. --max-concurrency and "
    "the providers' limits apply per worker.",
)
def command(
    config_path: Path | None,
    preset: str | None,
    env_file: Path | None,
    host: str,
    port: int,
    allow_unauthenticated: bool,
    max_concurrency: int,
    max_body_bytes: int,
    grace_period: float,
    no_ui: bool,
    metrics: bool,
    metrics_public: bool,
    cors_origins: tuple[str, ...],
    header_timeout: float,
    body_timeout: float,
    max_client_connections: int,
    workers: int,
) -> None:
    """Serve MoA pipelines as models of an OpenAI-compatible API at http://HOST:PORT/v1.

    Any OpenAI client can then use them: the request's `model` picks the pipeline. Set
    MOA_API_KEYS (comma-separated) to require `Authorization: Bearer <key>`. A web page at
    http://HOST:PORT/ shows each run's agents at work (--no-ui turns it off).
    """
    from moa.server import check_exposure, serve
    from moa.server.cors import check_origin
    from moa.server.guards import parse_api_keys

    origins = [check_origin(origin) for origin in cors_origins]  # before anything starts

    config, _ = load_selected(config_path, preset)
    env = environment(config, env_file)
    keys = parse_api_keys(env.get("MOA_API_KEYS"))
    check_exposure(host, keys, allow_unauthenticated)  # before any provider is built
    if metrics_public and not metrics:
        raise click.UsageError("--metrics-public needs --metrics")
    if metrics:
        from moa.server.metrics import ServerMetrics  # noqa: F401 - a missing extra fails early
    pipelines = open_pipelines(config, env=env)
    auth = f"{len(keys)} API key(s) required" if keys else "no API key required"

    def announce(url: str) -> None:
        click.echo(f"serving {', '.join(pipelines)} at {url}/v1 ({auth})")
        if not no_ui:
            click.echo(f"web page: {url}/")

    if workers > 1:
        from moa.server.workers import serve_workers

        run: Any = partial(serve_workers, workers=workers)
    else:
        run = serve
    run(
        pipelines,
        host=host,
        port=port,
        api_keys=keys,
        allow_unauthenticated=allow_unauthenticated,
        max_concurrency=max_concurrency,
        max_body_bytes=max_body_bytes,
        grace_period=grace_period,
        on_started=announce,
        ui=not no_ui,
        metrics=metrics,
        metrics_public=metrics_public,
        cors_origins=origins,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_client_connections=max_client_connections,
    )
