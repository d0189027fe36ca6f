"""`moa batch --engine ray`: the rows on a Ray cluster, the output written by the driver alone.

    driver (moa batch)                 Ray cluster
    RowLedger ── run(index, row) ──►  RowActor × N (one RowWorker each: pipeline, cache)
      writes each result once              │ admit / finish per upstream call
                                      GateActor (one Gatekeeper: every provider's limits)

Ray does the distribution: actors placed by its scheduler (one CPU each), restarted by it when
their process dies (`max_restarts`), method calls failing with an actor error for the rows the
dead process held, which the driver puts back in the queue. The driver only decides which row
goes to which actor next (the same RowLedger as `--workers`), so the output is exactly-once and
fsynced like any batch, and a killed driver resumes the same way. A restarted actor registers
with the GateActor under its name, which releases the leases of the process it replaces.

The cache file is opened by each actor on its own node: one cache per node, or one shared cache
when the path is on a file system every node sees.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Mapping
from typing import Any

from moa.batch.distributed import Job, RowDone, RowLedger
from moa.batch.rows import Row
from moa.batch.runner import RowWorker
from moa.batch.shared_limits import Gatekeeper, Limits, limited_providers, shared_limits
from moa.errors import MissingExtraError, WorkersFailed

__all__ = ["GateActor", "RowActor", "require_ray", "run_on_ray"]

#: Namespace of the actors, so a test or an operator can find them (`ray.get_actor`).
NAMESPACE = "moa-batch"
#: Seconds an actor whose call failed gets no new rows (Ray is restarting it).
RESTART_PAUSE_S = 1.0


def require_ray() -> Any:
    """The ray module, or the error that names the extra to install."""
    try:
        import ray
    except ImportError as error:
        raise MissingExtraError("moa batch --engine ray", "ray", error.name or "ray") from None
    return ray


class GateActor:
    """The Gatekeeper as a Ray actor: one per batch, holding every provider's limits."""

    def __init__(self, limits: Mapping[str, Limits]) -> None:
        self.gatekeeper = Gatekeeper(limits)

    async def admit(self, worker: str, provider: str, tokens: int) -> int:
        return await self.gatekeeper.admit(worker, provider, tokens)

    def finish(
        self, lease: int, used: int | None, retry_after: float | None, limited: bool | None
    ) -> None:
        self.gatekeeper.finish(lease, used, retry_after, limited)

    def register(self, name: str, incarnation: str) -> int:
        return self.gatekeeper.register(name, incarnation)

    def peak(self) -> dict[str, int]:
        return dict(self.gatekeeper.peak)


class RowActor:
    """One Ray worker: a RowWorker whose limits are the GateActor's."""

    def __init__(self, job: Job, gate: Any, name: str) -> None:
        self.gate = gate
        self.incarnation = f"{name}/{uuid.uuid4().hex[:8]}"
        require_ray().get(gate.register.remote(name, self.incarnation))
        self.worker = RowWorker.for_job(job, shared_limits(self._admit, self._finish))

    async def _admit(self, provider: str, tokens: int) -> int:
        lease: int = await self.gate.admit.remote(self.incarnation, provider, tokens)
        return lease

    def _finish(
        self, lease: int, used: int | None, retry_after: float | None, limited: bool | None
    ) -> None:
        self.gate.finish.remote(lease, used, retry_after, limited)

    async def run(self, index: int, row: Row) -> RowDone:
        return await self.worker.run(index, row)

    def pid(self) -> int:
        return os.getpid()


async def run_on_ray(job: Job, ledger: RowLedger, *, workers: int, address: str | None) -> None:
    """Run every row waiting in `ledger` on `workers` Ray actors."""
    ray = require_ray()
    from ray.exceptions import RayActorError

    connected_here = not ray.is_initialized()
    if connected_here:
        # No address: a local cluster for this run, with a CPU for every worker (they wait on
        # the network, so more workers than cores is fine). Else "auto" or host:port.
        cpus = max(workers, os.cpu_count() or 1) if address is None else None
        ray.init(
            address=address,
            num_cpus=cpus,
            namespace=NAMESPACE,
            include_dashboard=False,
            log_to_driver=False,
        )
    actors: dict[str, Any] = {}
    gate: Any = None
    running: dict[asyncio.Future[Any], tuple[str, int]] = {}
    try:
        gate = ray.remote(num_cpus=0, max_concurrency=100_000)(GateActor).remote(
            limited_providers(job.config.providers)
        )
        remote_row_actor = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=0)(RowActor)
        # Named, so a test or an operator can find them; unique per run, since the actors of
        # an earlier run in the same session may still be going away.
        run = uuid.uuid4().hex[:8]
        names = [f"row-worker-{run}-{n}" for n in range(1, workers + 1)]
        actors = {
            name: remote_row_actor.options(
                name=name, namespace=NAMESPACE, max_concurrency=max(2, job.concurrency + 1)
            ).remote(job, gate, name)
            for name in names
        }
        give_back_limit = 4 * workers * job.concurrency + 10

        loop = asyncio.get_running_loop()
        #: An actor whose call failed is left alone for a while: Ray is restarting it, and
        #: calls to a restarting actor fail at once (they would spin otherwise).
        resting: dict[str, float] = {}

        def hand_out(name: str) -> None:
            if resting.get(name, 0.0) > loop.time():
                return
            while len(ledger.held.get(name, ())) < job.concurrency:
                index = ledger.take(name)
                if index is None:
                    return
                future = asyncio.wrap_future(
                    actors[name].run.remote(index, ledger.rows[index]).future()
                )
                running[future] = (name, index)

        while running or ledger.waiting:
            for name in names:
                hand_out(name)
            if not running:
                await asyncio.sleep(RESTART_PAUSE_S / 4)
                continue
            done, _ = await asyncio.wait(
                list(running), timeout=RESTART_PAUSE_S, return_when=asyncio.FIRST_COMPLETED
            )
            for future in done:
                name, index = running.pop(future)
                error = future.exception()
                if error is None:
                    await ledger.done(name, future.result())
                elif isinstance(error, RayActorError):
                    ledger.give_back(name, index)  # Ray restarts the actor; the row runs again
                    resting[name] = loop.time() + RESTART_PAUSE_S
                    # An actor that cannot come back fails every call: stop rather than spin.
                    if ledger.requeued > give_back_limit:
                        raise WorkersFailed(
                            f"the Ray workers keep dying ({ledger.requeued} rows given back; "
                            f"last: {error}); rerun the same command to resume"
                        )
                else:
                    raise error
        if not ledger.finished:
            raise WorkersFailed("the Ray workers stopped before every row was run")
    finally:
        for future in running:  # calls of a failed run: their outcome no longer matters
            future.cancel()
        # Gone with this run, not whenever the handles are collected.
        for actor in [*actors.values(), *([gate] if gate is not None else [])]:
            ray.kill(actor, no_restart=True)
        if connected_here:
            ray.shutdown()
