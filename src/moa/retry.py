"""The single retry policy: which failures to retry and how long to wait before the next try."""

from __future__ import annotations

import random
from dataclasses import dataclass

from moa.errors import ProviderError, ProviderStatusError

__all__ = ["RetryDecision", "backoff", "decide_retry"]

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 20.0


def backoff(failures: int) -> float:
    """The longest wait after `failures` failures in a row: doubling from BACKOFF_BASE_S, up
    to BACKOFF_CAP_S. The one backoff of the package (calls, and providers paused by a 429)."""
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** (failures - 1))


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    wait_s: float = 0.0
    reason: str = ""


def decide_retry(
    error: ProviderError, *, attempt: int, max_attempts: int, max_retry_wait: float
) -> RetryDecision:
    """Whether to try again after `attempt` (1-based) failed with `error`, and after how long.

    Connection errors, timeouts, 408/409/429/5xx and malformed answers are retried with
    exponential backoff and jitter. A server's Retry-After is obeyed exactly, unless it asks
    for longer than `max_retry_wait`: then waiting would stall the whole layer, so the call
    fails at once and the layer goes on with the other agents.
    """
    if not error.retryable:
        return RetryDecision(False, reason="not retryable")
    if attempt >= max_attempts:
        return RetryDecision(False, reason=f"gave up after {attempt} attempts")
    if isinstance(error, ProviderStatusError) and error.retry_after is not None:
        if error.retry_after > max_retry_wait:
            return RetryDecision(
                False,
                reason=f"Retry-After of {error.retry_after:g} s exceeds "
                f"max_retry_wait={max_retry_wait:g} s",
            )
        return RetryDecision(True, wait_s=error.retry_after)
    ceiling = backoff(attempt)
    # "Equal jitter": at least half the ceiling, so retries back off, spread over the rest.
    wait = ceiling / 2 + random.uniform(0, ceiling / 2)
    return RetryDecision(True, wait_s=min(wait, max_retry_wait))
