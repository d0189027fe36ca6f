"""One exception tree for the whole package.

    MoAError
    ├── ConfigError                 bad config file, unknown preset, missing API key
    ├── InvalidRequest              a prompt or messages that cannot be run (also a ValueError)
    │   └── InputFileError              an input file (batch rows, evaluation outputs) unusable
    ├── MissingExtraError           an optional dependency is not installed (also an ImportError)
    ├── OutputError                 a result could not be written (full disk, a path unusable)
    ├── ProviderError               one upstream call failed; carries provider, model, status
    │   ├── ProviderConnectionError     could not connect, or the connection dropped
    │   ├── ProviderTimeout             a deadline passed (whole call or first token)
    │   ├── ProviderStatusError         an HTTP error status, with the server's Retry-After
    │   │   ├── RateLimited                 429: the provider is slowed down, not just retried
    │   │   └── ContextLengthExceeded       the prompt did not fit the model's context
    │   ├── MalformedResponse           a 200 that is not a usable chat completion
    │   └── StreamInterrupted           a stream died after text had arrived (keeps the text)
    ├── RunError                    a MoA run could not produce an answer
    │   ├── LayerFailed                 fewer than `min_ok` agents of a layer succeeded
    │   ├── AggregatorFailed            the aggregator and all its fallbacks failed
    │   └── BudgetExceeded              the next call would pass `max_total_tokens`
    ├── BatchIncomplete             some rows of `moa batch` have no answer; a rerun retries them
    │   └── WorkersFailed               its worker processes or Ray actors kept dying
    ├── EvaluationFailed            an evaluation could score nothing
    ├── ApiError                    (moa serve) a request answered with an error status
    └── ClientGone                  (moa serve) the client hung up before its body arrived

The CLI exits with 2 for what the user must fix before running again (ConfigError,
InvalidRequest, MissingExtraError: `USAGE_ERRORS`) and with 1 for every other MoAError.

Messages never contain API keys: providers are named by their config name, not their key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from moa._secrets import redact

if TYPE_CHECKING:
    from moa.results import AgentResult, RunResult

__all__ = [
    "USAGE_ERRORS",
    "AggregatorFailed",
    "ApiError",
    "BatchIncomplete",
    "BudgetExceeded",
    "ClientGone",
    "ConfigError",
    "ContextLengthExceeded",
    "EvaluationFailed",
    "InputFileError",
    "InvalidRequest",
    "LayerFailed",
    "MalformedResponse",
    "MissingExtraError",
    "MoAError",
    "OutputError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderStatusError",
    "ProviderTimeout",
    "RateLimited",
    "RunError",
    "StreamInterrupted",
    "WorkersFailed",
]


class MoAError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(MoAError):
    """The configuration cannot be used as given. The message says where and how to fix it."""


class InvalidRequest(MoAError, ValueError):
    """The prompt or messages given to a run are unusable; the message says which and why."""


class InputFileError(InvalidRequest):
    """An input file (batch rows, outputs to evaluate) cannot be used; the message names the
    file, the row where there is one, and what was expected."""


class OutputError(MoAError):
    """A result could not be written: a full disk, a path that is a directory or cannot be
    made, a file another run holds. Not a usage error: what was saved before is kept, and the
    same command can be run again once the cause is fixed."""


class MissingExtraError(MoAError, ImportError):
    """An optional dependency is missing; the message names the pip command that installs it."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        self.extra = extra
        super().__init__(
            f"{feature} needs the '{module}' package, which is not installed: "
            f"run  pip install 'mixture-of-agents[{extra}]'"
        )


class Upstream(TypedDict, total=False):
    """Where a provider error happened, and what the server said: keywords of every one."""

    provider: str
    model: str
    body: str | None


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
        retry_after: float | None = None,
        **upstream: Unpack[Upstream],
    ) -> None:
        #: Seconds the server asked us to wait (429, or a 503 while it is overloaded).
        self.retry_after = retry_after
        super().__init__(message, status_code=status_code, **upstream)

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        code = self.status_code or 0
        return code in (408, 409, 429) or code >= 500


class RateLimited(ProviderStatusError):
    """429: we sent too much. Unlike a 5xx (the server's trouble), it slows the provider down."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, **upstream: Unpack[Upstream]
    ) -> None:
        super().__init__(message, status_code=429, retry_after=retry_after, **upstream)


class ContextLengthExceeded(ProviderStatusError):
    """Not retried as-is: the caller shrinks the references first."""

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return False


class MalformedResponse(ProviderError):
    """A 200 carrying HTML, invalid JSON or no choices: treated like a 5xx."""

    retryable = True


class StreamInterrupted(ProviderError):
    """The stream broke after `partial` had been received; never passed off as an answer.

    Retried only where no one was shown the partial text (see `moa.calls.call_agent`)."""

    retryable = True

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


class BatchIncomplete(MoAError):
    """Some rows of a batch have no answer after the run; rerunning retries them."""


class WorkersFailed(BatchIncomplete):
    """The batch's worker processes or Ray actors kept dying (or could not start): the batch
    stopped; rerunning the same command resumes it."""


class EvaluationFailed(MoAError):
    """Nothing could be scored: every judge call failed or no verdict could be read."""


class ApiError(MoAError):
    """(moa serve) A request we answer with an error status, in OpenAI's format
    (`moa.server.errors` turns it into a response). Raised anywhere below an endpoint."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        #: Top-level keys sent beside "error" (the partial `moa` result of a failed run).
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error, **self.extra}


class ClientGone(MoAError):
    """(moa serve) The client hung up before its request body had arrived."""


#: What the user must fix before running again: the CLI exits with 2 for these, 1 for the rest.
USAGE_ERRORS: tuple[type[MoAError], ...] = (ConfigError, InvalidRequest, MissingExtraError)
