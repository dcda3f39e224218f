"""The Redis store's Lua scripts, and the argument and reply encodings they share with its pipelines.

One module for what Redis runs and how its numbers are written, so the scripts and
the cluster's pipelined equivalents cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from cachemw.core.entry import ENTRY_LEADER, HEAD_SIZE, STORED_AT_OFFSET, WINDOWS_OFFSET
from cachemw.core.keyspace import lock_key, wait_key
from cachemw.store.base import LockResult

__all__ = ["FILL_ALL_SCRIPT", "INDEX_SCRIPT", "LOCK_ALL_SCRIPT", "SOFTEN_SCRIPT", "UNLOCK_SCRIPT", "fill_call",
           "generation", "lookup_lock_call", "lookup_lock_result", "millis", "score", "soften_args"]

# The entry, its lock and its "someone waits" flag share the key's hash tag, so each
# script stays in one slot. A lock attempt that finds the lock taken raises the flag; a
# fill or release announces itself only when the flag is up: with nobody waiting (the
# common case) no message goes out, and no subscriber anywhere has to read one.
#
# A tag's index: entry keys scored by expiry; expired members are dropped on every
# write, and the index itself lives as long as its longest-lived member.
INDEX_SCRIPT = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return 1
"""
# On one server a miss's lock attempt and a fill are one script each, over the entry's
# three keys plus the tag indexes and generations: one command for the client to encode
# and parse instead of up to a dozen. On a cluster those span slots, so the scripts get
# only the entry's three keys, and pipelines next to them do the rest.
# ARGV[3] = '1' (a lookup of a route that has been missing): a value is returned at
# once, and only its absence takes the lock, so a miss costs one round trip, not two.
# Every redis.call costs Redis about a microsecond on top of the command itself, and a
# miss runs both scripts: reads are one MGET, and a lock and its flag go in one DEL.
# A lock already held under the caller's own token is taken: a retried attempt whose
# first try took it (the reply lost to a timeout) must not mistake itself for another
# filler and leave the lock to expire.
LOCK_ALL_SCRIPT = """
local found = redis.call('MGET', KEYS[1], unpack(KEYS, 4))
local value = found[1]
if value and ARGV[3] == '1' then return {2, value} end
local taken = 0
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then taken = 1
elseif redis.call('GET', KEYS[2]) == ARGV[1] then taken = 1
else redis.call('SET', KEYS[3], '1', 'PX', ARGV[2]) end
table.remove(found, 1)
return {taken, value or false, found}
"""
# A tag's index is extended only when it would otherwise expire within 30 s of its
# longest-lived member (ARGV[7] is that member's ttl + 60 s), not on every fill; a new
# index has no expired members to drop.
FILL_ALL_SCRIPT = """
local tags = tonumber(ARGV[8])
local current = 1
if #KEYS > 3 + tags then
  local found = redis.call('MGET', unpack(KEYS, 4 + tags))
  for i = 1, #found do
    if (found[i] or '0') ~= ARGV[8 + i] then current = 0 break end
  end
end
if current == 1 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  local keep = tonumber(ARGV[7])
  for i = 1, tags do
    local index = KEYS[3 + i]
    local left = redis.call('PTTL', index)
    redis.call('ZADD', index, ARGV[6], KEYS[1])
    if left ~= -2 then redis.call('ZREMRANGEBYSCORE', index, '-inf', ARGV[5]) end
    if left < keep - 30000 then redis.call('PEXPIRE', index, keep) end
  end
end
local woken
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then woken = redis.call('DEL', KEYS[2], KEYS[3]) == 2
else woken = redis.call('DEL', KEYS[3]) == 1 end
if woken then redis.call('PUBLISH', ARGV[4], KEYS[1]) end
return current
"""
UNLOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if redis.call('DEL', KEYS[1], KEYS[2]) == 2 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
  return 1
end
return 0
"""
# A soft purge of one entry: ``cachemw.core.entry.soften`` in Redis. Its stored_at is rewritten in
# place (SETRANGE keeps the key's expiry) to ARGV[1] - its ttl, unless it is older already; what
# cannot be served stale (no stale window, an older format, a pass marker, anything foreign under our
# name, a key of another type) is deleted. 0: no such key, 1: marked stale, 2: deleted. One key a
# call, so on a Cluster each runs in its entry's slot.
SOFTEN_SCRIPT = f"""
local value = redis.pcall('GET', KEYS[1])
if not value then return 0 end
if type(value) ~= 'string' or #value < {HEAD_SIZE} or string.sub(value, 1, {len(ENTRY_LEADER)}) ~= ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 2
end
local stored_at = struct.unpack('<d', value, {STORED_AT_OFFSET + 1})
local ttl, stale_for = struct.unpack('<dd', value, {WINDOWS_OFFSET + 1})
if not (stale_for > 0 and ttl >= 0 and ttl < math.huge) then
  redis.call('DEL', KEYS[1])
  return 2
end
local stale = tonumber(ARGV[1]) - ttl
if stored_at > stale then redis.call('SETRANGE', KEYS[1], {STORED_AT_OFFSET}, struct.pack('<d', stale)) end
return 1
"""


def soften_args(stale_from: float) -> list[bytes | str]:
    """``SOFTEN_SCRIPT``'s arguments: the time exactly as Python has it (``repr`` round-trips), the leader."""
    return [repr(stale_from), ENTRY_LEADER]


def generation(value: object) -> int:
    """A generation key's value as read back; anything else under the key (it is attacker-writable) is 0."""
    if value is None:  # a tag never invalidated (the usual case): no exception raised and caught
        return 0
    try:
        return int(value)  # type: ignore[call-overload,no-any-return]
    except (TypeError, ValueError):
        return 0  # a foreign value under a generation key counts as none


def score(seconds: float, rounding: Callable[[float], int]) -> str:
    """A tag index score in whole milliseconds: Redis parses a float of 17 digits with strtod's slow path."""
    return f"{rounding(seconds * 1000) / 1000:.3f}"


def millis(seconds: float) -> int:
    """Redis milliseconds: rounded up, and at least 1 (PX 0 is an error; a tiny ttl should still store)."""
    return max(1, math.ceil(seconds * 1000))


def lookup_lock_call(key: str, ttl: float, generation_keys: Sequence[str], token: str
                     ) -> tuple[list[str], list[str | int]]:
    """``LOCK_ALL_SCRIPT``'s keys and arguments for a lookup that also tries the lock (``get_or_lock``)."""
    return [key, lock_key(key), wait_key(key), *generation_keys], [token, millis(ttl), "1"]


def lookup_lock_result(reply: Any, token: str) -> LockResult:
    """``get_or_lock``'s answer from the script's reply: ``(None, value, ())`` when the key holds a value,
    else the lock attempt's ``(token or None, None, generations)``. A foreign shape raises ``ValueError``."""
    if not isinstance(reply, list) or not reply:
        raise ValueError(f"the lookup script answered {type(reply).__name__}")
    if reply[0] == 2:
        return None, reply[1], ()
    taken, _, generations = reply
    # Tags never invalidated (a miss's usual case) read back as nils: no call per generation then.
    if generations.count(None) == len(generations):
        return (token if taken else None), None, (0,) * len(generations)
    known = tuple(map(generation, generations))
    return (token if taken else None), None, known


def fill_call(key: str, value: bytes, ttl: float, token: str | None, channel: str, tag_sets: Sequence[str],
              generation_keys: Sequence[str], generations: Sequence[int], now: float
              ) -> tuple[list[str], list[bytes | str | int]]:
    """``FILL_ALL_SCRIPT``'s keys and arguments: store unless a generation moved, index, release, announce."""
    return ([key, lock_key(key), wait_key(key), *tag_sets, *generation_keys],
            [value, millis(ttl), token or "", channel, score(now, math.floor), score(now + ttl, math.ceil),
             millis(ttl + 60), len(tag_sets), *map(str, generations)])
