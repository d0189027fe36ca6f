"""Cost in US dollars from the prices a config gives per provider and model.

    providers:
      together:
        prices:
          "Qwen/Qwen2.5-72B-Instruct-Turbo": {input: 1.2, output: 1.2}   # $ per million tokens
          "*": {input: 0.9, output: 0.9}                                  # any other model

A model's own entry wins over "*". Calls with no price are counted, not guessed: a cost then
covers the priced calls only and says how many were left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from moa.config import Price, ProviderConfig
from moa.results import AgentResult, RunResult

__all__ = ["Cost", "agent_cost", "price_for", "run_cost"]

_PER = 1_000_000


@dataclass(frozen=True, slots=True)
class Cost:
    """Dollars for some calls; `unpriced` counts calls with tokens but no configured price."""

    usd: float = 0.0
    priced: int = 0
    unpriced: int = 0

    @property
    def known(self) -> bool:
        """Whether any price applied at all (else `usd` means nothing and is shown as n/a)."""
        return self.priced > 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.usd + other.usd, self.priced + other.priced, self.unpriced + other.unpriced
        )

    def to_json(self) -> float | None:
        """The figure to write in results: dollars rounded to a micro-dollar, or null."""
        return round(self.usd, 6) if self.known else None


def price_for(providers: Mapping[str, ProviderConfig], provider: str, model: str) -> Price | None:
    config = providers.get(provider)
    if config is None:
        return None
    return config.prices.get(model) or config.prices.get("*")


def agent_cost(providers: Mapping[str, ProviderConfig], result: AgentResult) -> Cost:
    """What one agent's calls (retries included) cost."""
    if result.usage.total_tokens == 0:
        return Cost()  # never reached the model, or a free answer: nothing to price
    price = price_for(providers, result.provider, result.model)
    if price is None:
        return Cost(unpriced=1)
    usage = result.usage
    usd = (usage.prompt_tokens * price.input + usage.completion_tokens * price.output) / _PER
    return Cost(usd, priced=1)


def run_cost(providers: Mapping[str, ProviderConfig], result: RunResult) -> Cost:
    """What a run cost: every proposer and every aggregator attempt."""
    return sum((agent_cost(providers, call) for call in result.calls), Cost())
