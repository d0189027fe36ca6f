"""Provider rate limits held once for a whole batch that runs in several processes or nodes.

    worker process / Ray actor                    the one Gatekeeper (driver / Ray actor)
    GatedProvider ─ admit(provider, tokens) ────────► LimitGate: slot, rpm, tpm, 429 pause
         │  upstream call                                 │
         └──────────── finish(lease, used, 429?) ────────►┘ slot freed, tokens settled

The gates are the same parts as `moa.providers.limits.RateLimitedProvider` (slots, token
buckets, the slow-down after a 429), kept in one place instead of one copy per worker, so
`max_concurrency: 64` means 64 calls in flight across every worker and a 429 seen by one worker
slows them all. The Gatekeeper does not care how it is reached: `moa.batch.workers` calls it
over a local socket, `moa.batch.ray_engine` from a Ray actor. A worker that dies holding leases
has them released by `release_worker`, so its slots are not lost.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Awaitable, Callable, Mapping

from moa.config import ProviderConfig
from moa.providers import Limiter, Provider
from moa.providers.limits import Finish, GatedProvider, LimitGate, Limits

__all__ = [
    "Gatekeeper",
    "LimitGate",
    "Limits",
    "limited_providers",
    "shared_limits",
]


def limited_providers(configs: Mapping[str, ProviderConfig]) -> dict[str, Limits]:
    """The providers of a config that have limits, and those limits."""
    return {name: Limits.of(config) for name, config in configs.items() if config.limited}


class Gatekeeper:
    """Every limited provider's gate, and the leases each worker holds."""

    def __init__(self, limits: Mapping[str, Limits]) -> None:
        self._gates = {name: LimitGate(value) for name, value in limits.items()}
        self._leases: dict[int, tuple[str, str, int]] = {}  # id: (worker, provider, tokens)
        self._ids = itertools.count(1)
        self._incarnations: dict[str, str] = {}
        #: Most leases held at once per provider: what tests check the limits against.
        self.peak: dict[str, int] = dict.fromkeys(self._gates, 0)

    async def admit(self, worker: str, provider: str, tokens: int) -> int:
        await self._gates[provider].admit(tokens)
        lease = next(self._ids)
        self._leases[lease] = (worker, provider, tokens)
        held = sum(1 for _, name, _ in self._leases.values() if name == provider)
        self.peak[provider] = max(self.peak[provider], held)
        return lease

    def finish(
        self,
        lease: int,
        used: int | None,
        retry_after: float | None = None,
        limited: bool | None = None,
    ) -> None:
        """Return a lease; `limited` as for LimitGate.finish (None: the call failed, or its
        worker died)."""
        held = self._leases.pop(lease, None)
        if held is not None:  # already released with its dead worker otherwise
            _, provider, tokens = held
            self._gates[provider].finish(tokens, used, retry_after, limited)

    def register(self, name: str, incarnation: str) -> int:
        """A worker called `name` (re)started as `incarnation`: the leases of the one it
        replaces (a crashed process that a cluster restarted) are released. Returns how many."""
        previous = self._incarnations.get(name)
        self._incarnations[name] = incarnation
        return self.release_worker(previous) if previous and previous != incarnation else 0

    def release_worker(self, worker: str) -> int:
        """Free the leases of a worker that died mid-call; returns how many there were."""
        mine = [lease for lease, (owner, _, _) in self._leases.items() if owner == worker]
        for lease in mine:
            self.finish(lease, None)
        return len(mine)


def shared_limits(admit: Callable[[str, int], Awaitable[int]], finish: Finish) -> Limiter:
    """A limiter for `moa.providers.build_providers`: each limited provider's calls are admitted
    by the Gatekeeper instead of by limits held in this process. `admit(provider, tokens)` waits
    for a lease; `finish(lease, used, retry_after, limited)` returns it. Both are whatever
    reaches the Gatekeeper (a socket, a Ray actor handle)."""

    def limit(name: str, config: ProviderConfig, provider: Provider) -> Provider:
        if not config.limited:
            return provider
        return GatedProvider(provider, Limits.of(config), functools.partial(admit, name), finish)

    return limit
