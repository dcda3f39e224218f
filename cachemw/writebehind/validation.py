"""What a write-behind accepts: names, keys and tuning, refused at once with the reason.

A bad value here would otherwise surface much later, in Redis or in the flusher.
"""

from __future__ import annotations

import math
import re

__all__ = ["MAX_KEY_LENGTH", "check_key", "check_name", "check_tuning"]

# No braces: the name is the Redis Cluster hash tag, and the prefix comes before it.
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_KEY_LENGTH = 1024


def check_name(label: str, value: str) -> None:
    """A queue name or key prefix: safe inside a Redis key and its hash tag."""
    if not _NAME.fullmatch(value):
        raise ValueError(f"{label} {value!r}: expected 1 to 64 of A-Z a-z 0-9 _ . : -")


def check_key(key: str) -> None:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
        raise ValueError(f"write-behind keys are strings of 1 to {MAX_KEY_LENGTH} characters, got {key!r:.80}")


def check_tuning(*, batch_size: int, batch_delay: float, max_attempts: int, retry_backoff: float,
                 max_backoff: float, claim_idle: float, flush_timeout: float, retain: float | None,
                 timeout: float, grace_period: float | None) -> None:
    """Durations are finite seconds (some may be 0), counts at least 1."""
    for label, number in (("batch_delay", batch_delay), ("retry_backoff", retry_backoff),
                          ("max_backoff", max_backoff)):
        if not 0 <= number < math.inf:
            raise ValueError(f"{label} must be a number of seconds >= 0, got {number!r}")
    for label, number in (("claim_idle", claim_idle), ("flush_timeout", flush_timeout), ("timeout", timeout)):
        if not 0 < number < math.inf:
            raise ValueError(f"{label} must be a number of seconds > 0, got {number!r}")
    if retain is not None and not 0 < retain < math.inf:
        raise ValueError(f"retain must be None or a number of seconds > 0, got {retain!r}")
    if grace_period is not None and not 0 <= grace_period < math.inf:
        raise ValueError(f"grace_period must be None or a number of seconds >= 0, got {grace_period!r}")
    if batch_size < 1 or max_attempts < 1:
        raise ValueError("batch_size and max_attempts must be at least 1")
