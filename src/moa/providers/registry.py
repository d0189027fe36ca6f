"""Provider types by name: what a config's `type:` selects.

A type is a config class (a `ProviderConfig` subclass whose `type` field is a Literal with its
name as default, holding the type's own keys) and a function that builds the provider from it.
A new backend is one module, a config class and a provider class, plus one call:

    register_provider_type(MyConfig, lambda name, config, env: MyProvider(name, config.url))

Configs name it at once (`type: mine`), and `moa.providers.build_providers` builds it with the
limits and the cache every type gets. The built-in types are registered below; their
modules are imported when a provider is built, so a config loads without llama.cpp installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from moa.config import LlamaCppProviderConfig, OpenAIProviderConfig, ProviderConfig
from moa.env import Environment
from moa.providers.base import Provider

__all__ = ["build_provider", "config_class", "register_provider_type", "type_names"]

C = TypeVar("C", bound=ProviderConfig)

#: Type name → (its config class, the function building its provider, unwrapped).
_TYPES: dict[str, tuple[type[ProviderConfig], Callable[[str, Any, Environment], Provider]]] = {}


def register_provider_type(
    config: type[C], build: Callable[[str, C, Environment], Provider]
) -> None:
    """Make `type: NAME` usable in configs, NAME being the default of `config`'s type field;
    `build(provider name, config, environment)` makes the provider. A name registered again
    is replaced."""
    name = config.model_fields["type"].default
    if not isinstance(name, str) or not name:
        raise TypeError(f"{config.__name__}.type needs its type name as default, as a Literal")
    _TYPES[name] = (config, build)


def config_class(name: str) -> type[ProviderConfig] | None:
    return _TYPES[name][0] if name in _TYPES else None


def type_names() -> list[str]:
    return list(_TYPES)


def build_provider(name: str, config: ProviderConfig, env: Environment) -> Provider:
    return _TYPES[config.type][1](name, config, env)


def _openai(name: str, config: OpenAIProviderConfig, env: Environment) -> Provider:
    from moa.providers.openai_compat import OpenAICompatibleProvider

    return OpenAICompatibleProvider(
        name,
        base_url=config.base_url,
        api_key=env.api_key(config.api_key_env, name) if config.api_key_env else None,
        context_window=config.context_window,
        continuation=config.continuation,
    )


def _llama_cpp(name: str, config: LlamaCppProviderConfig, env: Environment) -> Provider:
    from moa.providers.llama_cpp import LlamaCppProvider

    return LlamaCppProvider(
        name,
        model_path=config.model_path,
        n_ctx=config.n_ctx,
        n_threads=config.n_threads,
        parallel=config.parallel,
    )


register_provider_type(OpenAIProviderConfig, _openai)
register_provider_type(LlamaCppProviderConfig, _llama_cpp)
