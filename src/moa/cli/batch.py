"""`moa batch`: a pipeline over a dataset, resumable, cached, with benchmark exports.

    moa batch questions.jsonl -o answers.jsonl --config moa.yaml
    moa batch alpaca_eval.json -o answers.jsonl --format alpaca_eval --generator my-moa
    moa batch question.jsonl -o answers.jsonl --format mt_bench --export model_answer/my-moa.jsonl

Rerunning the same command resumes: finished rows are skipped, failed ones retried, and with
the call cache the retried rows' proposers that already answered are not called again.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Literal

import click

from moa.batch.export import (
    ExportFormat,
    check_export_path,
    check_exportable,
    default_export_path,
    export,
)
from moa.batch.progress import BatchStats, make_progress
from moa.batch.rows import Row, load_rows
from moa.batch.runner import pipeline_fingerprint, run_batch
from moa.batch.store import OutputStore
from moa.cli.batch_scale import Engine, run_scaled
from moa.cli.options import (
    FILE,
    cache_file,
    cache_options,
    environment,
    load_selected,
    pipeline_options,
)
from moa.config import ConfigFile
from moa.engine import MoA
from moa.errors import BatchIncomplete, ConfigError
from moa.providers.cache import CallCache

__all__ = ["command"]


@click.command()
@click.argument("input_path", metavar="INPUT", type=FILE)
@click.option(
    "-o",
    "--output",
    "output_path",
    required=True,
    type=FILE,
    help="JSONL of results, one line per row; rerun with the same file to resume.",
)
@pipeline_options
@click.option(
    "-j",
    "--concurrency",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Rows run at once. Upstream calls are further capped by each provider's "
    "max_concurrency / rpm / tpm.",
)
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["jsonl", "alpaca_eval", "mt_bench", "flask"]),
    default="jsonl",
    show_default=True,
    help="Also write the finished answers for AlpacaEval, MT-Bench (FastChat) or FLASK after "
    "the run.",
)
@click.option(
    "--export",
    "export_path",
    type=FILE,
    help="Where --format writes (default: beside OUT, answers.jsonl → "
    "answers.alpaca_eval.json, answers.mt_bench.jsonl or answers.flask.jsonl).",
)
@click.option("--generator", help="Model name in exports and records (default: the pipeline's).")
@click.option(
    "--keep-other-pipelines",
    is_flag=True,
    help="Accept an OUT whose finished rows another pipeline made: they are kept, and exported "
    "under their own generator name.",
)
@cache_options
@click.option(
    "--progress-interval",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds between progress lines when stderr is not a terminal.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes (with --engine ray: Ray actors) running the rows. One writer keeps "
    "the output exactly-once; provider limits and the cache are shared by all of them.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where workers run: processes on this machine, or a Ray cluster (extra [ray]).",
)
@click.option(
    "--ray-address",
    help="With --engine ray: the cluster to join ('auto' inside `ray job submit`); "
    "default: start a local one.",
)
def command(
    input_path: Path,
    output_path: Path,
    config_path: Path | None,
    preset: str | None,
    pipeline: str | None,
    env_file: Path | None,
    concurrency: int,
    export_format: Literal["jsonl", "alpaca_eval", "mt_bench", "flask"],
    export_path: Path | None,
    generator: str | None,
    keep_other_pipelines: bool,
    cache_path: Path | None,
    no_cache: bool,
    progress_interval: float,
    workers: int,
    engine: Engine,
    ray_address: str | None,
) -> None:
    """Run a pipeline over every row of INPUT (JSONL or a JSON list), saving each to OUT.

    A row holds `instruction` (AlpacaEval), `turns` (MT-Bench), `messages` (OpenAI) or `text`
    (FLASK); its id is `id`, `question_id`, `idx` or its position. Exit code 1 if some rows
    failed: rerun to retry.
    """
    cache = cache_file(cache_path, no_cache)
    if export_path is not None and export_format == "jsonl":
        raise click.UsageError("--export needs --format alpaca_eval, mt_bench or flask")
    config, selected = load_selected(config_path, preset)
    generator = generator or pipeline or (config_path.stem if config_path else selected)
    rows = load_rows(input_path)
    fmt: ExportFormat | None = None if export_format == "jsonl" else export_format
    if fmt is not None:
        check_exportable(rows, fmt, input_path)
        export_path = export_path or default_export_path(output_path, fmt)
    _refuse_same_file(input_path, output_path, export_path)
    if export_path is not None:
        check_export_path(export_path)
    if ray_address is not None and engine != "ray":
        raise click.UsageError("--ray-address needs --engine ray")
    scale = None if workers == 1 and engine == "local" else (workers, engine, ray_address)

    stats = asyncio.run(
        _run(
            rows,
            output_path,
            config=config,
            pipeline=pipeline,
            env_file=env_file,
            concurrency=concurrency,
            generator=generator,
            keep_other_pipelines=keep_other_pipelines,
            cache_path=cache,
            progress_interval=progress_interval,
            fmt=fmt,
            export_path=export_path,
            scale=scale,
            input_path=input_path,
        )
    )
    unfinished = stats.total - stats.skipped - stats.succeeded
    if unfinished:
        raise BatchIncomplete(
            f"{unfinished} of {stats.total} rows have no answer (their errors are in "
            f"{output_path}): rerun the same command to retry them"
        )


async def _run(
    rows: list[Row],
    output_path: Path,
    *,
    config: ConfigFile,
    pipeline: str | None,
    env_file: Path | None,
    concurrency: int,
    generator: str,
    keep_other_pipelines: bool,
    cache_path: Path | None,
    progress_interval: float,
    fmt: ExportFormat | None,
    export_path: Path | None,
    scale: tuple[int, Engine, str | None] | None = None,
    input_path: Path | None = None,
) -> BatchStats:
    fingerprint = pipeline_fingerprint(config.resolve(pipeline))
    store = OutputStore.open(output_path)
    try:
        # Checked whether or not rows are pending: a rerun whose rows are all finished would
        # otherwise export another pipeline's answers under this one's name.
        _check_other_pipelines(store, fingerprint, keep_other_pipelines)
        stats = BatchStats(total=len(rows), skipped=sum(row.key in store.finished for row in rows))
        if stats.to_run == 0:
            click.echo(
                f"batch: all {stats.total} rows are already finished in {output_path}", err=True
            )
        elif scale is not None and input_path is not None:
            await run_scaled(
                rows,
                input_path,
                store,
                stats,
                config=config,
                pipeline=pipeline,
                env=environment(config, env_file),
                concurrency=concurrency,
                generator=generator,
                cache_path=cache_path,
                progress_interval=progress_interval,
                workers=scale[0],
                engine=scale[1],
                ray_address=scale[2],
            )
        else:
            await _run_pending(
                rows,
                store,
                stats,
                config=config,
                pipeline=pipeline,
                env_file=env_file,
                concurrency=concurrency,
                generator=generator,
                cache_path=cache_path,
                progress_interval=progress_interval,
            )
    finally:
        await store.aclose()
    if fmt is not None and export_path is not None:
        summary = export(
            fmt, export_path, rows, store.records(), generator=generator, pipeline=fingerprint
        )
        incomplete = (
            f" ({summary.missing} rows without an answer left out)" if summary.missing else ""
        )
        click.echo(
            f"batch: wrote {summary.written} answers to {summary.path}{incomplete}", err=True
        )
    return stats


async def _run_pending(
    rows: list[Row],
    store: OutputStore,
    stats: BatchStats,
    *,
    config: ConfigFile,
    pipeline: str | None,
    env_file: Path | None,
    concurrency: int,
    generator: str,
    cache_path: Path | None,
    progress_interval: float,
) -> None:
    env = environment(config, env_file)
    cache = CallCache(cache_path) if cache_path is not None else None
    with cache if cache is not None else contextlib.nullcontext():
        moa = MoA.from_config(config, pipeline, env=env, name=generator, cache=cache)
        stats.cache = cache.stats if cache is not None else None
        progress = make_progress(sys.stderr, interval=progress_interval)
        progress.start(stats)
        completed = False
        try:
            async with moa:
                await run_batch(
                    moa, rows, store, stats, progress, concurrency=concurrency, generator=generator
                )
            completed = True
        finally:
            progress.finish(stats, completed=completed)


def _check_other_pipelines(store: OutputStore, fingerprint: str, keep: bool) -> None:
    """A finished row made by another pipeline configuration must never pass for this one's:
    refuse, unless told to keep such rows (exports then label them with their own generator)."""
    other = [
        record
        for record in store.records().values()
        if record.get("ok") is True and record.get("pipeline") != fingerprint
    ]
    if not other:
        return
    names = sorted({str(r.get("generator") or "?") for r in other})
    made_by = f"a different pipeline configuration (generator {', '.join(names)})"
    if not keep:
        raise ConfigError(
            f"{len(other)} finished rows in {store.path} were made by {made_by}; they would be "
            "passed off as this pipeline's answers. Use another --output for this pipeline, or "
            "pass --keep-other-pipelines to keep them under their own generator name"
        )
    click.echo(
        f"warning: {len(other)} finished rows in {store.path} were made by {made_by}; kept, "
        "and exported under their own generator name (--keep-other-pipelines)",
        err=True,
    )


def _refuse_same_file(input_path: Path, output_path: Path, export_path: Path | None) -> None:
    paths = {"INPUT": input_path, "--output": output_path}
    if export_path is not None:
        paths["--export"] = export_path
    seen: dict[Path, str] = {}
    for option, path in paths.items():
        resolved = path.resolve()
        if resolved in seen:
            raise click.UsageError(f"{option} and {seen[resolved]} name the same file: {path}")
        seen[resolved] = option
