"""Options shared by every command that runs a pipeline, and how they become a MoA."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from moa.config import ConfigFile, load_config
from moa.env import Environment
from moa.errors import ConfigError
from moa.presets import preset_config

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_PRESET = "local"


def pipeline_options(func: F) -> F:
    """--config / --preset / --pipeline / --env-file."""
    decorators = [
        click.option(
            "-c",
            "--config",
            "config_path",
            type=click.Path(dir_okay=False, path_type=Path),
            help="A YAML config file.",
        ),
        click.option(
            "-p", "--preset", help=f"A preset name (see `moa presets`); default {DEFAULT_PRESET}."
        ),
        click.option("--pipeline", help="Which pipeline of a multi-pipeline config to use."),
        click.option(
            "--env-file",
            type=click.Path(dir_okay=False, path_type=Path),
            help="A .env file to read API keys from.",
        ),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def load_selected(config_path: Path | None, preset: str | None) -> tuple[ConfigFile, str]:
    """The config chosen by --config or --preset, and a name for it."""
    if config_path is not None and preset is not None:
        raise click.UsageError("give either --config or --preset, not both")
    if config_path is not None:
        return load_config(config_path), "moa"
    name = preset or DEFAULT_PRESET
    return preset_config(name), name


def environment(config: ConfigFile, env_file: Path | None) -> Environment:
    path = env_file or (Path(config.env_file) if config.env_file else None)
    if path is not None and not path.is_file():
        raise ConfigError(f"{path}: no such .env file")
    return Environment(env_file=path)
