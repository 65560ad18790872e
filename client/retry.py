"""Retry policy: capped exponential backoff with jitter (seedable) that honours Retry-After on 429/503."""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before retrying.

    Attempt k (0-based) waits `min(backoff_max_s, backoff_base_s * 2**k)` scaled by a factor drawn uniformly
    from [1 - jitter, 1] ("equal jitter" when jitter = 0.5); a Retry-After header on a retryable status wins
    (capped at `max_retry_after_s`, plus up to `jitter * backoff_base_s` so clients do not retry in lock-step).
    Validation errors (400/401/403/404/413/422) are never retried.
    """

    max_retries: int = 3
    backoff_base_s: float = 0.25
    backoff_max_s: float = 8.0
    jitter: float = 0.5
    retry_statuses: frozenset[int] = frozenset({429, 502, 503, 504})
    retry_connect_errors: bool = True
    retry_timeouts: bool = False
    max_retry_after_s: float = 60.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("backoff_base_s, backoff_max_s and max_retry_after_s must be >= 0")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        never = {400, 401, 403, 404, 413, 422} & set(self.retry_statuses)
        if never:
            raise ValueError(f"statuses {sorted(never)} are client errors and are never retried")

    @classmethod
    def none(cls) -> RetryPolicy:
        """No retries at all (e.g. for load generation)."""
        return cls(max_retries=0)

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with jitter for retry number `attempt` (0-based), in seconds."""
        base = min(self.backoff_max_s, self.backoff_base_s * (2.0 ** attempt))
        return base * (1.0 - self.jitter * rng.random())

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry `attempt`: the server's Retry-After when given, else backoff."""
        if retry_after is not None:
            return min(self.max_retry_after_s, max(0.0, retry_after)) + self.jitter * self.backoff_base_s * rng.random()
        return self.backoff(attempt, rng)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds (fractions accepted) or an HTTP date; None when absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
