"""A policy in words, as operators read it in ``cachemw routes``, ``inspect`` and the dashboard.

Pure: shared by the command line and the observe layer, so both say a policy the same way.
"""

from __future__ import annotations

from cachemw.core.policy import Policy

__all__ = ["describe_policy", "format_duration"]


def format_duration(seconds: float) -> str:
    """The shortest exact unit (``90s`` stays seconds, ``120s`` is ``2m``), as durations are written in config."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds < 1 and seconds > 0:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def describe_policy(policy: Policy | None) -> str:
    """One line with only what differs from no caching: the preset's name, then its non-zero settings."""
    if policy is None:
        return "-"
    if not policy.cacheable:
        return f"{policy.preset or 'custom'} (not cached)"
    parts = [f"ttl={format_duration(policy.ttl)}"]
    if policy.stale_while_revalidate:
        parts.append(f"swr={format_duration(policy.stale_while_revalidate)}")
    if policy.stale_if_error:
        parts.append(f"sie={format_duration(policy.stale_if_error)}")
    if policy.sync:
        parts.append(f"sync={format_duration(policy.sync)}")
    if policy.private:
        parts.append("private")
    if policy.vary:
        parts.append("vary=" + ",".join(policy.vary))
    if policy.query is not None:
        parts.append("query=" + ",".join(policy.query))
    if policy.tags:
        parts.append("tags=" + ",".join(policy.tags))
    head = f"{policy.preset}: " if policy.preset else ""
    return head + " ".join(parts)
