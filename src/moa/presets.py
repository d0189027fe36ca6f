"""Ready-made pipelines, each an ordinary config (the same schema as a YAML file)."""

from __future__ import annotations

from typing import Any

from moa.config import ConfigFile, parse_config
from moa.errors import ConfigError

__all__ = ["PRESETS", "preset_config", "preset_description"]

#: The hosted providers presets use: each one's endpoint and the variable that holds its key.
_ENDPOINTS = {
    "together": {"base_url": "https://api.together.xyz/v1", "api_key_env": "TOGETHER_API_KEY"},
    "groq": {"base_url": "https://api.groq.com/openai/v1", "api_key_env": "GROQ_API_KEY"},
    "openai": {"base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY"},
}

_TOGETHER_PROPOSERS = [
    "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "Qwen/Qwen2.5-72B-Instruct-Turbo",
    "Qwen/Qwen2.5-Coder-32B-Instruct",
    "microsoft/WizardLM-2-8x22B",
]
_PAPER_PROPOSERS = [
    "Qwen/Qwen1.5-110B-Chat",
    "Qwen/Qwen1.5-72B-Chat",
    "microsoft/WizardLM-2-8x22B",
    "meta-llama/Llama-3-70b-chat-hf",
    "mistralai/Mixtral-8x22B-Instruct-v0.1",
    "databricks/dbrx-instruct",
]

_QWEN25_72B = "Qwen/Qwen2.5-72B-Instruct-Turbo"


def _hosted(provider: str, proposers: list[str], aggregator: str, *, layers: int) -> dict[str, Any]:
    """A hosted preset: the models `proposers` at temperature 0.7 and 512 tokens, a 2048-token
    aggregator."""
    return {
        "providers": {provider: _ENDPOINTS[provider]},
        "proposers": [{"provider": provider, "model": model} for model in proposers],
        "aggregator": {"provider": provider, "model": aggregator, "max_tokens": 2048},
        "layers": layers,
        "temperature": 0.7,
        "max_tokens": 512,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # Offline: the embedded SmolLM2-135M answering seven times (greedily, then six samples);
    # the answer that agrees most with the others, and that its model is surest of, wins
    # (strategy confidence: no aggregator call). Tuned on benchmarks/quality.py, where it
    # beat the model alone by 5.7 ± 2.0 points: see BENCHMARKS.md. No seeds: each request
    # samples afresh. No system prompt: a short one ("Answer briefly.") did not help.
    "local": {
        # 2048 tokens a call (questions and 96-token answers need far less) lets 8 calls
        # decode at once within the default cache size: see LlamaCppProvider.
        "providers": {"local": {"type": "llama-cpp", "n_ctx": 2048}},
        "proposers": [
            {"provider": "local", "temperature": 0.0},
            {"provider": "local", "temperature": 0.7, "samples": 6},
        ],
        "aggregator": {"provider": "local", "strategy": "confidence", "agreement_weight": 10},
        "layers": 2,
        "max_tokens": 96,
        # Each call's deadline counts its wait for the model: on a busy 2-core machine seven
        # answers take minutes.
        "timeout": 600,
    },
    "together": _hosted("together", _TOGETHER_PROPOSERS, _QWEN25_72B, layers=3),
    "together-lite": _hosted("together", _TOGETHER_PROPOSERS, _QWEN25_72B, layers=2),
    # The paper's setups (Wang et al. 2024, section 3.1): six open proposers, temperature 0.7.
    "paper-moa": _hosted("together", _PAPER_PROPOSERS, "Qwen/Qwen1.5-110B-Chat", layers=3),
    "paper-moa-lite": _hosted("together", _PAPER_PROPOSERS, "Qwen/Qwen1.5-72B-Chat", layers=2),
    "groq": _hosted(
        "groq",
        [
            "llama-3.3-70b-versatile",
            "openai/gpt-oss-120b",
            "qwen/qwen3-32b",
            "llama-3.1-8b-instant",
        ],
        "llama-3.3-70b-versatile",
        layers=2,
    ),
    "openai": _hosted(
        "openai", ["gpt-4.1-mini", "gpt-4o-mini", "gpt-4.1-nano"], "gpt-4.1", layers=2
    ),
}

_DESCRIPTIONS = {
    "local": "offline: SmolLM2-135M answers 7 times, the most agreed and confident wins; no key",
    "together": "Together's MoA recipe, 3 layers (TOGETHER_API_KEY)",
    "together-lite": "Together's MoA recipe, 2 layers (TOGETHER_API_KEY)",
    "paper-moa": "the paper's MoA: 6 open proposers, 3 layers, Qwen1.5-110B aggregates",
    "paper-moa-lite": "the paper's MoA-Lite: 2 layers, Qwen1.5-72B aggregates",
    "groq": "open models on Groq, 2 layers (GROQ_API_KEY)",
    "openai": "OpenAI models, 2 layers (OPENAI_API_KEY)",
}


def preset_description(name: str) -> str:
    return _DESCRIPTIONS.get(name, "")


def preset_config(name: str) -> ConfigFile:
    try:
        data = PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)} (see `moa presets`)"
        ) from None
    return parse_config(data, source=f"preset {name!r}", inline_name=name)
