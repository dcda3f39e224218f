"""The Lua scripts that keep a write-behind's Redis keys consistent, and how they are run.

Each script changes a value, the stream and the counters in one step, so no
crash leaves one without the other. Every key a script touches carries the
queue's ``{name}`` hash tag: on a cluster each runs on the one node owning it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

__all__ = ["ACK", "DEAD_LETTER", "PRUNE", "PUT", "REQUEUE", "STATUS", "Script", "command"]


async def command(client: Redis | RedisCluster, *args: Any, **options: Any) -> Any:
    """One command, its reply as the server sent it (typed ``Any``: the RESP2 lists ``replies`` parses)."""
    return await client.execute_command(*args, **options)


_PUT = """
if ARGV[3] ~= '' then
  local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
  if current ~= tonumber(ARGV[3]) then return {0, current} end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local version = redis.call('INCR', KEYS[3])
if version < now then
  version = now
  redis.call('SET', KEYS[3], version)
end
redis.call('HSET', KEYS[1], 'version', version, 'value', ARGV[2])
redis.call('PERSIST', KEYS[1])
local id = redis.call('XADD', KEYS[2], '*', 'key', ARGV[1], 'version', version, 'value', ARGV[2])
return {1, version, id}
"""
# Acknowledge and delete together: an entry acknowledged but not deleted would stay
# in the stream for ever, and one deleted but not acknowledged would stay pending.
_ACK = """
local n = tonumber(ARGV[3])
local ids = {}
for i = 1, n do ids[i] = ARGV[3 + i] end
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
if acked > 0 then redis.call('HINCRBY', KEYS[2], 'flushed', acked) end
local retain = tonumber(ARGV[2])
if retain > 0 then
  for i = 3, #KEYS do
    if redis.call('HGET', KEYS[i], 'version') == ARGV[3 + n + i - 2] then redis.call('PEXPIRE', KEYS[i], retain) end
  end
end
return acked
"""
_DEAD = """
redis.call('XADD', KEYS[2], '*', 'key', ARGV[2], 'version', ARGV[3], 'value', ARGV[4], 'error', ARGV[5],
           'attempts', ARGV[6], 'id', ARGV[7])
local ids = {}
for i = 7, #ARGV do ids[#ids + 1] = ARGV[i] end
redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
redis.call('HINCRBY', KEYS[3], 'dead_lettered', 1)
return 1
"""
_REQUEUE = """
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return 0 end
local fields = {}
local flat = found[1][2]
for i = 1, #flat, 2 do fields[flat[i]] = flat[i + 1] end
redis.call('XADD', KEYS[2], '*', 'key', fields['key'], 'version', fields['version'], 'value', fields['value'])
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'requeued', 1)
return 1
"""
# Deleting a consumer drops its pending entries from the group (they would never be
# delivered again): only consumers with none, checked in the same script.
_PRUNE = """
local removed = 0
for _, info in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local c = {}
  for i = 1, #info, 2 do c[info[i]] = info[i + 1] end
  if c['name'] ~= ARGV[2] and c['pending'] == 0 and c['idle'] >= tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c['name'])
    removed = removed + 1
  end
end
return removed
"""

# One consistent snapshot from the stream's own node: on a cluster, a TIME sent on its
# own would go to some other node (and its clock).
_STATUS = """
local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
if groups['err'] then groups = {} end
return {redis.call('TIME'), redis.call('XLEN', KEYS[1]), redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1),
        redis.call('XLEN', KEYS[2]), redis.call('HGETALL', KEYS[3]), groups}
"""


class Script:
    """A Lua script run by its SHA1, and sent whole when the server does not know it yet.

    Not redis-py's ``Script``: on a cluster that loads a missing script with SCRIPT
    LOAD on every primary, so one primary down would fail the scripts of all the
    others; EVAL loads it on the one node that runs it.
    """

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, client: Redis | RedisCluster, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await command(client, "EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await command(client, "EVAL", self.text, len(keys), *keys, *args)


PUT, ACK, DEAD_LETTER, REQUEUE, PRUNE, STATUS = (
    Script(text) for text in (_PUT, _ACK, _DEAD, _REQUEUE, _PRUNE, _STATUS))
