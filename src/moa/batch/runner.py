"""Running rows through one MoA pipeline in one process, each result saved as it ends.

`RowWorker` runs a row and makes its output line, wherever it runs: here (`run_batch`, with
`concurrency` rows at once, each row's agents concurrently inside it) or in a worker process or
Ray actor. The limits on upstream calls are the providers' own (max_concurrency, rpm, tpm),
shared by all rows. Rows are handed out from the ledger's one queue to a fixed set of tasks, so
a 100k-row input never becomes 100k pending tasks. A row that fails is saved with its error and
its partial results; only a failure to write the output stops the batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from moa.batch.distributed import Job, RowDone, RowLedger
from moa.batch.rows import Row
from moa.config import Pipeline
from moa.engine import MoA
from moa.env import Environment
from moa.errors import InvalidRequest, RunError
from moa.pricing import Cost, agent_cost, run_cost
from moa.providers import Limiter, local_limits
from moa.providers.base import ChatMessage
from moa.providers.cache import CallCache
from moa.results import RunResult, Usage

__all__ = ["RowOutcome", "RowWorker", "pipeline_fingerprint", "run_batch", "run_row"]

log = logging.getLogger("moa.batch")

#: The ledger's name for the one worker of a run in this process.
_HERE = "this-process"


@dataclass(frozen=True, slots=True)
class RowOutcome:
    row: Row
    ok: bool
    #: One result per turn that ran (a failed turn's partial result included).
    runs: tuple[RunResult, ...]
    error: str | None
    usage: Usage
    cost: Cost
    latency_s: float

    @property
    def outputs(self) -> list[str]:
        """The final answer of each turn that succeeded."""
        return [run.output for run in self.runs if run.ok]


def pipeline_fingerprint(pipeline: Pipeline) -> str:
    """A short hash of what decides the answers (agents, settings, layout), stored with every
    row so that a resumed run can tell whether the output was made by another pipeline."""
    shape = repr(
        (
            pipeline.layers,
            pipeline.aggregator,
            pipeline.fallbacks,
            pipeline.references_in,
            pipeline.max_total_tokens,
        )
    )
    return hashlib.sha256(shape.encode("utf-8")).hexdigest()[:12]


async def run_row(moa: MoA, row: Row) -> RowOutcome:
    """Run one row turn by turn, each turn seeing the earlier turns' final answers."""
    started = time.monotonic()
    conversation: list[ChatMessage] = list(row.history)
    runs: list[RunResult] = []
    error: str | None = None
    for number, turn in enumerate(row.turns, start=1):
        conversation.append({"role": "user", "content": turn})
        where = f"turn {number}: " if len(row.turns) > 1 else ""
        try:
            result = await moa.arun(conversation)
        except RunError as failure:
            if failure.result is not None:
                runs.append(failure.result)
            error = f"{where}{failure}"
            break
        except InvalidRequest as failure:  # checked when the input was read; kept as a guard
            error = f"{where}{failure}"
            break
        except Exception as failure:  # a bug: keep the batch going, but say so loudly
            log.warning("row %s: unexpected error", row.key, exc_info=True)
            error = f"{where}internal error: {type(failure).__name__}: {failure}"
            break
        runs.append(result)
        conversation.append({"role": "assistant", "content": result.output})
    return RowOutcome(
        row=row,
        ok=error is None,
        runs=tuple(runs),
        error=error,
        usage=sum((run.usage for run in runs), Usage()),
        cost=sum((run_cost(moa.provider_configs, run) for run in runs), Cost()),
        latency_s=time.monotonic() - started,
    )


def row_record(
    outcome: RowOutcome, *, generator: str, pipeline_id: str, moa: MoA
) -> dict[str, Any]:
    """The output line for a row: the answers first, then what produced them and the input."""
    record: dict[str, Any] = {
        "id": outcome.row.id,
        "ok": outcome.ok,
        "output": outcome.runs[-1].output if outcome.ok else "",
        "outputs": outcome.outputs,
        "error": outcome.error,
        "generator": generator,
        "pipeline": pipeline_id,
        "usage": outcome.usage.to_dict(),
        "cost_usd": outcome.cost.to_json(),
        "latency_s": round(outcome.latency_s, 4),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": [_run_details(run, moa) for run in outcome.runs],
        "row": outcome.row.data,
    }
    if outcome.row.notes:
        record["notes"] = list(outcome.row.notes)
    return record


def _run_details(run: RunResult, moa: MoA) -> dict[str, Any]:
    """RunResult.to_dict with each agent's cost beside its tokens."""
    providers = moa.provider_configs
    details = run.to_dict()
    for layer, layer_dict in zip(run.layers, details["layers"], strict=True):
        for agent, agent_dict in zip(layer.agents, layer_dict, strict=True):
            agent_dict["cost_usd"] = agent_cost(providers, agent).to_json()
    details["aggregator"]["cost_usd"] = agent_cost(providers, run.aggregator).to_json()
    details["cost_usd"] = run_cost(providers, run).to_json()
    return details


class RowWorker:
    """Runs rows through one pipeline, each to its output line and the figures for stats."""

    def __init__(self, moa: MoA, generator: str, cache: CallCache | None = None) -> None:
        self.moa = moa
        self.generator = generator
        #: Closed with the worker; its counters go back with every row.
        self.cache = cache
        self.pipeline_id = pipeline_fingerprint(moa.pipeline)

    @classmethod
    def for_job(
        cls, job: Job, limits: Limiter = local_limits, env: Environment | None = None
    ) -> RowWorker:
        """The pipeline of `job`, its cache opened here, its calls admitted by `limits` (this
        process's own, or a Gatekeeper's shared by every worker). `env` is the driver's full
        environment, for the worker in its own process (a provider type added by
        register_provider_type may read any variable); elsewhere a worker sees only job.env."""
        cache = CallCache(job.cache_path) if job.cache_path is not None else None
        try:
            moa = MoA.from_config(
                job.config,
                job.pipeline,
                env=env if env is not None else Environment(job.env),
                name=job.generator,
                cache=cache,
                limits=limits,
            )
        except BaseException:
            if cache is not None:
                cache.close()
            raise
        return cls(moa, job.generator, cache)

    async def run(self, index: int, row: Row) -> RowDone:
        outcome = await run_row(self.moa, row)
        record = row_record(
            outcome, generator=self.generator, pipeline_id=self.pipeline_id, moa=self.moa
        )
        stats = self.cache.stats if self.cache is not None else None
        counters = (stats.hits, stats.misses, stats.writes) if stats is not None else None
        return RowDone(index, record, outcome.ok, outcome.usage, outcome.cost, counters)

    async def aclose(self) -> None:
        try:
            await self.moa.aclose()
        finally:
            if self.cache is not None:
                self.cache.close()


async def run_batch(worker: RowWorker, ledger: RowLedger, *, concurrency: int) -> None:
    """Run every row waiting in `ledger` in this process, `concurrency` at once."""

    async def work() -> None:
        # One shared queue: each row goes to exactly one task.
        while (index := ledger.take(_HERE)) is not None:
            done = await worker.run(index, ledger.rows[index])
            await ledger.done(_HERE, done)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, min(concurrency, len(ledger.waiting)))):
                group.create_task(work())
    except BaseExceptionGroup as failures:
        # Only a failure to save a row ends up here; report it as itself, not as a group.
        raise failures.exceptions[0] from None
