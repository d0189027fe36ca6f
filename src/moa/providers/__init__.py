"""Backends behind one protocol, and the one place providers are built.

    config ─► registry: the type's build ─► limits (max_concurrency / rpm / tpm) ─► cache

`build_providers` is the factory every face goes through (via `moa.engine`): it builds each
provider from its type's registration (moa.providers.registry) and wraps it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from moa.config import ProviderConfig
from moa.env import Environment
from moa.errors import ConfigError
from moa.providers.base import ChatMessage, ChatRequest, Completion, Provider, StreamChunk
from moa.providers.registry import build_provider, register_provider_type

if TYPE_CHECKING:
    from moa.providers.cache import CallCache

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "Completion",
    "Limiter",
    "Provider",
    "StreamChunk",
    "build_providers",
    "local_limits",
    "register_provider_type",
]

#: Wraps a provider in its config's limits: (name, config, provider) → provider.
Limiter = Callable[[str, ProviderConfig, Provider], Provider]


def local_limits(name: str, config: ProviderConfig, provider: Provider) -> Provider:
    """The limits held in this process: one limiter per provider, shared by every pipeline,
    row and agent that uses it. (A batch spread over processes holds them elsewhere:
    moa.batch.shared_limits.)"""
    if not config.limited:
        return provider
    from moa.providers.limits import Limits, RateLimitedProvider

    return RateLimitedProvider(provider, Limits.of(config))


def build_providers(
    configs: Mapping[str, ProviderConfig],
    used: Iterable[str],
    env: Environment,
    *,
    cache: CallCache | None = None,
    limits: Limiter = local_limits,
) -> dict[str, Provider]:
    """The providers named in `used`, each built by its type and wrapped in its limits, then
    in `cache` if given (outermost: a cached answer takes no slot). Every missing key is
    reported before anything is built, in one ConfigError naming the variables."""
    names = sorted(set(used))
    missing = [
        f"{variable} (provider {n!r})"
        for n in names
        for variable in configs[n].env_names()
        if env.get(variable) is None
    ]
    if missing:
        raise ConfigError(
            f"missing API key{'s' if len(missing) > 1 else ''}: set {', '.join(missing)} "
            "in the environment (or in a .env file named with --env-file)"
        )
    providers: dict[str, Provider] = {}
    for name in names:
        config = configs[name]
        provider = limits(name, config, build_provider(name, config, env))
        if cache is not None:
            from moa.providers.cache import CachedProvider

            provider = CachedProvider(provider, cache, base_url=config.endpoint())
        providers[name] = provider
    return providers
