"""One exception tree for the whole package.

    MoAError
    ├── ConfigError                 bad config file, unknown preset, missing API key (exit code 2)
    ├── InvalidRequest              a prompt or messages that cannot be run (also a ValueError)
    ├── MissingExtraError           an optional dependency is not installed (also an ImportError)
    ├── ProviderError               one upstream call failed; carries provider, model, status
    │   ├── ProviderConnectionError     could not connect, or the connection dropped
    │   ├── ProviderTimeout             a deadline passed (whole call or first token)
    │   ├── ProviderStatusError         an HTTP error status
    │   │   ├── RateLimited                 429, with the server's Retry-After if it sent one
    │   │   └── ContextLengthExceeded       the prompt did not fit the model's context
    │   ├── MalformedResponse           a 200 that is not a usable chat completion
    │   └── StreamInterrupted           a stream died after text had arrived (keeps the text)
    └── RunError                    a MoA run could not produce an answer
        ├── LayerFailed                 fewer than `min_ok` agents of a layer succeeded
        ├── AggregatorFailed            the aggregator and all its fallbacks failed
        └── BudgetExceeded              the next call would pass `max_total_tokens`

Messages never contain API keys: providers are named by their config name, not their key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from moa._secrets import redact

if TYPE_CHECKING:
    from moa.results import AgentResult, RunResult

__all__ = [
    "AggregatorFailed",
    "BudgetExceeded",
    "ConfigError",
    "ContextLengthExceeded",
    "InvalidRequest",
    "LayerFailed",
    "MalformedResponse",
    "MissingExtraError",
    "MoAError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderStatusError",
    "ProviderTimeout",
    "RateLimited",
    "RunError",
    "StreamInterrupted",
]


class MoAError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(MoAError):
    """The configuration cannot be used as given. The message says where and how to fix it."""


class InvalidRequest(MoAError, ValueError):
    """The prompt or messages given to a run are unusable; the message says which and why."""


class MissingExtraError(MoAError, ImportError):
    """An optional dependency is missing; the message names the pip command that installs it."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        self.extra = extra
        super().__init__(
            f"{feature} needs the '{module}' package, which is not installed: "
            f"run  pip install 'mixture-of-agents[{extra}]'"
        )


class ProviderError(MoAError):
    """One upstream call failed."""

    #: Whether the retry loop may try the same call again.
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        model: str = "",
        status_code: int | None = None,
        body: str | None = None,
    ) -> None:
        self.provider = provider
        self.model = model
        self.status_code = status_code
        # Upstream bodies sometimes echo the key back ("Incorrect API key provided: sk-…").
        self.body = None if body is None else redact(body)
        super().__init__(redact(message))

    def describe(self) -> str:
        """A one-line account of the failure, naming where it happened."""
        where = "/".join(part for part in (self.provider, self.model) if part)
        return f"{where}: {self}" if where else str(self)


class ProviderConnectionError(ProviderError):
    retryable = True


class ProviderTimeout(ProviderError):
    retryable = True


class ProviderStatusError(ProviderError):
    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        provider: str = "",
        model: str = "",
        body: str | None = None,
    ) -> None:
        super().__init__(
            message, provider=provider, model=model, status_code=status_code, body=body
        )

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        code = self.status_code or 0
        return code in (408, 409, 429) or code >= 500


class RateLimited(ProviderStatusError):
    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        provider: str = "",
        model: str = "",
        body: str | None = None,
        status_code: int = 429,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(
            message, status_code=status_code, provider=provider, model=model, body=body
        )


class ContextLengthExceeded(ProviderStatusError):
    """Not retried as-is: the caller shrinks the references first."""

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return False


class MalformedResponse(ProviderError):
    """A 200 carrying HTML, invalid JSON or no choices: treated like a 5xx."""

    retryable = True


class StreamInterrupted(ProviderError):
    """The stream broke after `partial` had been received; never passed off as an answer."""

    def __init__(self, message: str, *, partial: str, provider: str = "", model: str = "") -> None:
        self.partial = partial
        super().__init__(message, provider=provider, model=model)


class RunError(MoAError):
    """A MoA run ended without a final answer.

    `result` holds what the run did get done (layers, partial text) with `ok=False`.
    """

    result: RunResult | None = None


class LayerFailed(RunError):
    def __init__(self, layer: int, min_ok: int, results: Sequence[AgentResult]) -> None:
        self.layer = layer
        self.min_ok = min_ok
        self.results = list(results)
        ok = sum(r.ok for r in results)
        causes = "; ".join(f"{r.label}: {r.error or r.status}" for r in results if not r.ok)
        super().__init__(
            f"layer {layer}: {ok} of {len(results)} agents succeeded, {min_ok} needed ({causes})"
        )


class AggregatorFailed(RunError):
    def __init__(self, results: Sequence[AgentResult]) -> None:
        self.results = list(results)
        self.partial = next((r.output for r in reversed(results) if r.output), "")
        causes = "; ".join(f"{r.label}: {r.error or r.status}" for r in results)
        super().__init__(f"the aggregator failed ({causes})")


class BudgetExceeded(RunError):
    def __init__(self, used: int, needed: int, limit: int) -> None:
        self.used, self.needed, self.limit = used, needed, limit
        super().__init__(
            f"max_total_tokens={limit} would be exceeded: {used} tokens used so far and the next "
            f"call may need up to {needed}; raise max_total_tokens or lower max_tokens"
        )
