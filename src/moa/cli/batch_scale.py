"""`moa batch --workers N` and `--engine ray`: the driver's side, between the CLI and the engines.

The command checks everything it can before any worker starts (keys, the pipeline, the output
lock), so a bad config is one clear line from the driver, not N from the workers.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Literal

import click

from moa.batch.distributed import Job, RowLedger
from moa.batch.progress import BatchStats, make_progress
from moa.batch.rows import Row
from moa.batch.store import OutputStore
from moa.config import ConfigFile
from moa.engine import MoA
from moa.env import Environment

__all__ = ["Engine", "run_scaled"]

Engine = Literal["local", "ray"]


async def run_scaled(
    rows: list[Row],
    input_path: Path,
    store: OutputStore,
    stats: BatchStats,
    *,
    config: ConfigFile,
    pipeline: str | None,
    env: Environment,
    concurrency: int,
    generator: str,
    cache_path: Path | None,
    progress_interval: float,
    workers: int,
    engine: Engine,
    ray_address: str | None,
) -> None:
    if engine == "ray":
        from moa.batch.ray_engine import require_ray

        require_ray()  # before anything starts: a missing extra is one line
    await MoA.from_config(config, pipeline, env=env).aclose()  # keys and pipeline, checked once
    # Workers get the API keys the providers name, nothing else from this environment.
    keys = {
        name: value
        for p in config.providers.values()
        for name in p.env_names()
        if (value := env.get(name)) is not None
    }
    job = Job(
        config=config,
        pipeline=pipeline,
        env=keys,
        generator=generator,
        cache_path=cache_path,
        concurrency=max(1, math.ceil(concurrency / workers)),
    )
    progress = make_progress(sys.stderr, interval=progress_interval)
    progress.start(stats)
    completed = False
    ledger: RowLedger | None = None
    try:
        if engine == "ray":
            from moa.batch.ray_engine import run_on_ray

            ledger = await run_on_ray(
                job, rows, store, stats, progress, workers=workers, address=ray_address
            )
        else:
            from moa.batch.workers import run_with_workers

            ledger = await run_with_workers(
                job, input_path, rows, store, stats, progress, workers=workers
            )
        completed = True
        stats.ended = time.monotonic()
    finally:
        progress.finish(stats, completed=completed)
    if ledger.requeued:
        click.echo(
            f"batch: {ledger.requeued} rows were re-run after their worker stopped", err=True
        )
