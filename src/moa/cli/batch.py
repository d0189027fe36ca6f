"""`moa batch`: a pipeline over a dataset, resumable, cached, with benchmark exports.

    moa batch questions.jsonl -o answers.jsonl --config moa.yaml
    moa batch alpaca_eval.json -o answers.jsonl --format alpaca_eval --generator my-moa
    moa batch question.jsonl -o answers.jsonl --format mt_bench --export model_answer/my-moa.jsonl

Rerunning the same command resumes: finished rows are skipped, failed ones retried, and with
the call cache the retried rows' proposers that already answered are not called again.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from pathlib import Path
from typing import Literal

import click

from moa.batch.distributed import Job, RowLedger
from moa.batch.export import (
    ExportFormat,
    check_export_path,
    check_exportable,
    default_export_path,
    export,
)
from moa.batch.progress import BatchStats, showing_progress
from moa.batch.rows import Row, load_rows
from moa.batch.runner import RowWorker, pipeline_fingerprint, run_batch
from moa.batch.store import OutputStore
from moa.cli.options import (
    FILE,
    cache_file,
    cache_options,
    environment,
    load_selected,
    pipeline_options,
)
from moa.engine import MoA
from moa.env import Environment
from moa.errors import BatchIncomplete, ConfigError

__all__ = ["command"]

Engine = Literal["local", "ray"]


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
    job = Job(
        config=config,
        pipeline=pipeline,
        env={},  # _run fills it in once it knows rows are pending
        generator=generator or pipeline or (config_path.stem if config_path else selected),
        cache_path=cache,
        concurrency=math.ceil(concurrency / workers),
    )
    stats = asyncio.run(
        _run(
            job,
            rows,
            input_path,
            output_path,
            env_file=env_file,
            keep_other_pipelines=keep_other_pipelines,
            progress_interval=progress_interval,
            fmt=fmt,
            export_path=export_path,
            workers=workers,
            engine=engine,
            ray_address=ray_address,
        )
    )
    unfinished = stats.total - stats.skipped - stats.succeeded
    if unfinished:
        raise BatchIncomplete(
            f"{unfinished} of {stats.total} rows have no answer (their errors are in "
            f"{output_path}): rerun the same command to retry them"
        )


async def _run(
    job: Job,
    rows: list[Row],
    input_path: Path,
    output_path: Path,
    *,
    env_file: Path | None,
    keep_other_pipelines: bool,
    progress_interval: float,
    fmt: ExportFormat | None,
    export_path: Path | None,
    workers: int,
    engine: Engine,
    ray_address: str | None,
) -> BatchStats:
    fingerprint = pipeline_fingerprint(job.config.resolve(job.pipeline))
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
        else:
            # Read only now that rows are pending: a rerun that only exports needs no .env
            # file, and a bad pipeline or a locked output is reported as itself.
            env = environment(job.config, env_file)
            if workers == 1 and engine == "local":
                # Built before the progress starts: a bad key is one line, not a stopped bar.
                worker = RowWorker.for_job(job, env=env)
                try:
                    with showing_progress(stats, interval=progress_interval) as progress:
                        ledger = RowLedger(rows, store, stats, progress)
                        await run_batch(worker, ledger, concurrency=job.concurrency)
                finally:
                    await worker.aclose()
            else:
                await _run_scaled(
                    job,
                    env,
                    rows,
                    input_path,
                    store,
                    stats,
                    progress_interval,
                    workers,
                    engine,
                    ray_address,
                )
    finally:
        await store.aclose()
    if fmt is not None and export_path is not None:
        summary = export(
            fmt, export_path, rows, store.records(), generator=job.generator, pipeline=fingerprint
        )
        incomplete = (
            f" ({summary.missing} rows without an answer left out)" if summary.missing else ""
        )
        click.echo(
            f"batch: wrote {summary.written} answers to {summary.path}{incomplete}", err=True
        )
    return stats


async def _run_scaled(
    job: Job,
    env: Environment,
    rows: list[Row],
    input_path: Path,
    store: OutputStore,
    stats: BatchStats,
    progress_interval: float,
    workers: int,
    engine: Engine,
    ray_address: str | None,
) -> None:
    """--workers N / --engine ray: this process hands out the rows and writes the output.
    Everything that can be checked is checked here first (the extra, the keys, the pipeline),
    so a bad config is one clear line from the driver, not N from the workers."""
    if engine == "ray":
        from moa.batch.ray_engine import require_ray

        require_ray()
    await MoA.from_config(job.config, job.pipeline, env=env).aclose()
    # Workers get the API keys the providers name, nothing else from this environment.
    keys = {
        name: value
        for p in job.config.providers.values()
        for name in p.env_names()
        if (value := env.get(name)) is not None
    }
    job = replace(job, env=keys)
    with showing_progress(stats, interval=progress_interval) as progress:
        ledger = RowLedger(rows, store, stats, progress)
        if engine == "ray":
            from moa.batch.ray_engine import run_on_ray

            await run_on_ray(job, ledger, workers=workers, address=ray_address)
        else:
            from moa.batch.workers import run_with_workers

            await run_with_workers(job, input_path, ledger, workers=workers)
    if ledger.requeued:
        click.echo(
            f"batch: {ledger.requeued} rows were re-run after their worker stopped", err=True
        )


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
    paths = {"INPUT": input_path, "--output": output_path, "--export": export_path}
    seen: dict[Path, str] = {}
    for option, path in paths.items():
        if path is None:
            continue
        resolved = path.resolve()
        if resolved in seen:
            raise click.UsageError(f"{option} and {seen[resolved]} name the same file: {path}")
        seen[resolved] = option
