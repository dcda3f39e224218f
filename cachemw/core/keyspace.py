"""Every Redis key and channel name cachemw uses, in one place: what an operator finds under a prefix.

Under ``{prefix}`` (``key_prefix``, "cachemw" by default):

- ``{prefix}:e:{route label}:{{digest}}``: an entry; ``...:lock`` and ``...:wait`` beside it
  (its fill lock and the flag that a fill is awaited), in the same Cluster slot;
- ``{prefix}:t:{{digest}}`` and ``{prefix}:g:{{digest}}``: a tag's index (the entry keys) and
  its generation (bumped by a purge), in one slot;
- ``{prefix}:fills`` and ``{prefix}:invalidations``: the pub/sub channels of fill and purge
  announcements;
- ``{prefix}:m:{host}:{pid}:{instance}``: a process's metrics for the fleet view;
- ``{prefix}:wb:{{name}}:...``: a write-behind queue's stream, values, dead letters, counters.

The braces are Redis Cluster hash tags. Pure string functions: the stores, the runtime,
the fleet view and the CLI build their names here, so none can disagree.
"""

from __future__ import annotations

import functools
import hashlib

__all__ = ["ALL_TAG", "entry_key", "entry_pattern", "entry_prefix", "everything_pattern", "fill_channel",
           "fleet_key", "fleet_pattern", "invalidation_channel", "is_entry_key", "lock_key", "tag_keys", "wait_key",
           "writebehind_base", "writebehind_pattern"]

ALL_TAG = "*"  # every entry under the prefix: bumped by a purge of everything


def entry_key(prefix: str, label: str, digest: str) -> str:
    """An entry: readable up to its route, then the request's digest as its Cluster hash tag."""
    return f"{prefix}:e:{label}:{{{digest}}}"


def entry_prefix(prefix: str) -> str:
    """What every entry key (and its lock and wait flag) starts with: the prefix Redis tracks for the L1."""
    return f"{prefix}:e:"


def is_entry_key(key: bytes) -> bool:
    """An entry key, not its lock or wait flag: entry keys end with their hash tag."""
    return key.endswith(b"}")


def entry_pattern(prefix: str) -> str:
    """A SCAN pattern for every entry under the prefix: entry keys end with their hash tag, locks do not."""
    return f"{prefix}:e:*}}"


def everything_pattern(prefix: str) -> str:
    """A SCAN pattern for every key under the prefix (a prefix has no glob characters)."""
    return f"{prefix}:*"


def lock_key(key: str) -> str:
    """The fill lock of an entry key, in its slot."""
    return key + ":lock"


def wait_key(key: str) -> str:
    """The flag that someone waits for an entry key's fill (so the fill announces itself), in its slot."""
    return key + ":wait"


@functools.lru_cache(maxsize=8192)
def tag_keys(prefix: str, tag: str) -> tuple[str, str]:
    """The Redis keys of a tag: its index (entry keys) and its generation, in one slot."""
    digest = hashlib.blake2b(tag.encode("utf-8", "backslashreplace"), digest_size=10).hexdigest()
    return f"{prefix}:t:{{{digest}}}", f"{prefix}:g:{{{digest}}}"


def fill_channel(prefix: str) -> str:
    return f"{prefix}:fills"


def invalidation_channel(prefix: str) -> str:
    return f"{prefix}:invalidations"


def fleet_key(prefix: str, host: str, pid: int, instance: str) -> str:
    """One process's metrics document, for ``cachemw stats`` (expires unless rewritten)."""
    return f"{prefix}:m:{host}:{pid}:{instance}"


def fleet_pattern(prefix: str) -> str:
    return f"{prefix}:m:*"


def writebehind_base(prefix: str, name: str) -> str:
    """What a write-behind queue's keys start with: its name is their Cluster hash tag."""
    return f"{prefix}:wb:{{{name}}}"


def writebehind_pattern(prefix: str) -> str:
    """A SCAN pattern for every write-behind key under the prefix."""
    return f"{prefix}:wb:{{*}}:*"
