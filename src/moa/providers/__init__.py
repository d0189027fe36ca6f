"""Backends behind one protocol: any OpenAI-compatible endpoint, and the embedded llama.cpp."""

from __future__ import annotations

from collections.abc import Iterable

from moa.config import ProviderConfig
from moa.env import Environment
from moa.providers.base import ChatMessage, ChatRequest, Completion, Provider, StreamChunk

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "Completion",
    "Provider",
    "StreamChunk",
    "build_providers",
]


def build_providers(
    configs: dict[str, ProviderConfig], used: Iterable[str], env: Environment
) -> dict[str, Provider]:
    """Instantiate the providers a pipeline uses. Every missing key is reported before any
    request is made, in one ConfigError naming the variables. A provider whose config sets
    max_concurrency, rpm or tpm comes wrapped in a `RateLimitedProvider`."""
    names = sorted(set(used))
    missing = [
        f"{configs[n].api_key_env} (provider {n!r})"
        for n in names
        if configs[n].api_key_env and env.get(configs[n].api_key_env or "") is None
    ]
    if missing:
        from moa.errors import ConfigError

        raise ConfigError(
            f"missing API key{'s' if len(missing) > 1 else ''}: set {', '.join(missing)} "
            "in the environment (or in a .env file named with --env-file)"
        )
    providers: dict[str, Provider] = {}
    for name in names:
        config = configs[name]
        if config.type == "llama-cpp":
            from moa.providers.llama_cpp import LlamaCppProvider

            providers[name] = LlamaCppProvider(
                name, model_path=config.model_path, n_ctx=config.n_ctx, n_threads=config.n_threads
            )
        else:
            from moa.providers.openai_compat import OpenAICompatibleProvider

            key = env.api_key(config.api_key_env, name) if config.api_key_env else None
            assert config.base_url is not None  # checked by ProviderConfig
            providers[name] = OpenAICompatibleProvider(
                name,
                base_url=config.base_url,
                api_key=key,
                context_window=config.context_window,
                continuation=config.continuation,
            )
        if config.max_concurrency is not None or config.rpm or config.tpm:
            # One limiter per provider, shared by every pipeline, row and agent that uses it.
            from moa.providers.limits import RateLimitedProvider

            providers[name] = RateLimitedProvider(
                providers[name],
                max_concurrency=config.max_concurrency,
                rpm=config.rpm,
                tpm=config.tpm,
            )
    return providers
