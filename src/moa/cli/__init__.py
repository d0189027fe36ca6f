"""The `moa` command. Each face lives in its own module; this one wires them and owns errors.

Exit codes: 0 success, 2 bad usage, config or input (`moa.errors.USAGE_ERRORS`: fix it and run
again), 1 a run that failed or a result that could not be written. Errors are one line on
stderr; -v adds the traceback and debug logging.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import click

from moa._version import __version__
from moa.env import RedactingFilter
from moa.errors import USAGE_ERRORS, MissingExtraError, MoAError

__all__ = ["cli", "main"]

EXIT_RUN_FAILED = 1
EXIT_USAGE = 2


class _Group(click.Group):
    """Turns our errors into one clear line and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except USAGE_ERRORS as error:
            _fail(ctx, error, EXIT_USAGE)
        except MoAError as error:
            _fail(ctx, error, EXIT_RUN_FAILED)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _fail(ctx: click.Context, error: BaseException, code: int) -> None:
    if ctx.meta.get("moa.verbose"):
        traceback.print_exception(error, file=sys.stderr)
    click.echo(f"error: {error}", err=True)
    ctx.exit(code)


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    if verbose:
        logging.getLogger("moa").setLevel(logging.DEBUG)
        logging.getLogger("aiohttp.client").setLevel(logging.INFO)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="moa")
@click.option("-v", "--verbose", is_flag=True, help="Debug log and tracebacks on stderr.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Mixture-of-Agents: several LLMs in layers, answering as one better model.

    With no --config or --preset, commands use the offline `local` preset.
    """
    ctx.meta["moa.verbose"] = verbose
    _setup_logging(verbose)
    _setup_tracing()


def _setup_tracing() -> None:
    """Export spans as OTEL_* asks, when the [otel] extra is installed (see moa.telemetry)."""
    from moa.telemetry import configure_from_env

    try:
        configure_from_env()
    except MissingExtraError as error:  # tracing is an extra: the command still runs
        click.echo(f"warning: {error}", err=True)


def _register() -> None:
    # Each command module imports its extra's packages only when the command runs, so every
    # command is listed (and says what to install) whatever extras are present.
    from moa.cli import batch, evaluate, mcp, run, serve

    for command in (run.ask, run.chat, run.presets):
        cli.add_command(command)
    cli.add_command(serve.command, "serve")
    cli.add_command(batch.command, "batch")
    cli.add_command(evaluate.command, "eval")
    cli.add_command(mcp.command, "mcp")


_register()


def main() -> None:
    cli(prog_name="moa")
