"""Options shared by the commands, declared once, and how they become a config and a cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from moa.config import ConfigFile, load_config
from moa.env import Environment
from moa.presets import preset_config
from moa.providers.cache import default_cache_path

F = TypeVar("F", bound=Callable[..., Any])
Decorator = Callable[[F], F]

DEFAULT_PRESET = "local"
FILE = click.Path(dir_okay=False, path_type=Path)


def options(*decorators: Decorator[Any]) -> Decorator[F]:
    """Several options as one decorator; --help lists them in the order given."""

    def apply(func: F) -> F:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


def config_option(help: str = "A YAML config file.") -> Decorator[F]:
    return click.option("-c", "--config", "config_path", type=FILE, help=help)


def preset_option(
    help: str = f"A preset name (see `moa presets`); default {DEFAULT_PRESET}.",
) -> Decorator[F]:
    return click.option("-p", "--preset", help=help)


def env_file_option(help: str = "A .env file to read API keys from.") -> Decorator[F]:
    return click.option("--env-file", type=FILE, help=help)


#: --config / --preset / --pipeline / --env-file: every command that runs one pipeline.
pipeline_options: Decorator[Any] = options(
    config_option(),
    preset_option(),
    click.option("--pipeline", help="Which pipeline of a multi-pipeline config to use."),
    env_file_option(),
)


def serving_options(
    config: str, preset: str, env_file: str, *, only: str = "", clients: str = "clients"
) -> Decorator[Any]:
    """What `moa serve` and `moa mcp` share: --config / --preset / --env-file (their help
    given), --host / --port / --allow-unauthenticated (`only`, "With --http", before theirs)."""

    def after(text: str) -> str:
        return f"{only}: {text[0].lower()}{text[1:]}" if only else text

    return options(
        config_option(config),
        preset_option(preset),
        env_file_option(env_file),
        click.option(
            "--host",
            default="127.0.0.1",
            show_default=True,
            help=after("The address to listen on."),
        ),
        click.option(
            "--port",
            type=click.IntRange(0, 65535),
            default=8000,
            show_default=True,
            help=after("The port to listen on (0: any free port)."),
        ),
        click.option(
            "--allow-unauthenticated",
            is_flag=True,
            help=after(
                f"Listen on a non-loopback address without authenticating {clients} (only "
                "behind something that checks them)."
            ),
        ),
    )


#: --cache / --no-cache: the call cache of `moa batch` and `moa eval` (see `cache_file`).
cache_options: Decorator[Any] = options(
    click.option(
        "--cache",
        "cache_path",
        type=FILE,
        help="The call cache file (default: calls.sqlite3 in the user cache directory, shared by "
        "`moa batch` and `moa eval`).",
    ),
    click.option(
        "--no-cache", is_flag=True, help="Neither read nor write the call cache: call again."
    ),
)


def cache_file(cache_path: Path | None, no_cache: bool) -> Path | None:
    """The call cache --cache / --no-cache choose: None for no cache."""
    if no_cache and cache_path is not None:
        raise click.UsageError("give either --cache or --no-cache, not both")
    return None if no_cache else (cache_path or default_cache_path())


def load_selected(config_path: Path | None, preset: str | None) -> tuple[ConfigFile, str]:
    """The config chosen by --config or --preset, and a name for it."""
    if config_path is not None and preset is not None:
        raise click.UsageError("give either --config or --preset, not both")
    if config_path is not None:
        return load_config(config_path), "moa"
    name = preset or DEFAULT_PRESET
    return preset_config(name), name


def environment(config: ConfigFile, env_file: Path | None) -> Environment:
    """The environment, with the .env file of --env-file, else the config's, applied."""
    return Environment(env_file=env_file or config.env_file or None)
