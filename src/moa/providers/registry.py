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
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from moa.config import LlamaCppProviderConfig, OpenAIProviderConfig, ProviderConfig
from moa.env import Environment
from moa.providers.base import Provider

__all__ = ["ProviderType", "config_class", "provider_type", "register_provider_type", "type_names"]

C = TypeVar("C", bound=ProviderConfig)


@dataclass(frozen=True, slots=True)
class ProviderType(Generic[C]):
    config: type[C]
    #: (provider name, its config, the environment) → the provider, unwrapped.
    build: Callable[[str, C, Environment], Provider]


_TYPES: dict[str, ProviderType[Any]] = {}


def register_provider_type(
    config: type[C], build: Callable[[str, C, Environment], Provider]
) -> None:
    """Make `type: NAME` usable in configs, NAME being the default of `config`'s type field.
    Registering a name again replaces it."""
    name = config.model_fields["type"].default
    if not isinstance(name, str) or not name:
        raise TypeError(f"{config.__name__}.type needs its type name as default, as a Literal")
    _TYPES[name] = ProviderType(config, build)


def provider_type(name: str) -> ProviderType[Any]:
    return _TYPES[name]


def config_class(name: str) -> type[ProviderConfig] | None:
    found = _TYPES.get(name)
    return None if found is None else found.config


def type_names() -> list[str]:
    return list(_TYPES)


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
        name, model_path=config.model_path, n_ctx=config.n_ctx, n_threads=config.n_threads
    )


register_provider_type(OpenAIProviderConfig, _openai)
register_provider_type(LlamaCppProviderConfig, _llama_cpp)
