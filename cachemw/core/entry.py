"""The stored entry and its binary format.

One codec module knows the bytes. A version byte leads so an old or foreign
value is recognised and treated as a miss; nothing here can run code (no
pickle), whatever bytes it is given.
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass

from cachemw.core.sizes import DICT_SLOT, alloc, bytes_cost, str_cost, tuple_cost

__all__ = ["ENTRY_LEADER", "HEAD_SIZE", "PASS_MARKER", "STORED_AT_OFFSET", "WINDOWS_OFFSET", "DecodedMemo",
           "Entry", "EntryDecodeError", "decode_entry", "encode_entry", "entry_cost", "is_pass_marker", "soften"]

_MAGIC = b"CMW"
VERSION = 2
_V1 = 1  # before the windows: still read (entries of a fleet mid-upgrade), never written
# magic, version, stored_at, status, n_headers, n_tags, body length; from version 2 the policy's ttl and
# stale_while_revalidate the entry was stored under follow, so a store can mark it stale by itself (soften).
_HEAD_V1 = struct.Struct("<3sBdHHHI")
_WINDOWS = struct.Struct("<dd")
_HEAD = struct.Struct(_HEAD_V1.format + "dd")
_STORED_AT = struct.Struct("<d")
STORED_AT_OFFSET = 4
"""Where ``stored_at`` (a little-endian double) sits in an entry's bytes: a store rewrites it in place."""
WINDOWS_OFFSET = _HEAD_V1.size
"""Where a version 2 entry's ttl and stale_while_revalidate (two little-endian doubles) sit."""
ENTRY_LEADER = _MAGIC + bytes([VERSION])
"""The first bytes of every entry this version writes."""
HEAD_SIZE = _HEAD.size
"""The fixed header's length: no entry is shorter."""
_LEN2 = struct.Struct("<HH")
_LEN1 = struct.Struct("<H")
MAX_HEADERS = 256

# What a key holds for a while when its response could not be stored (a Set-Cookie, private, a status
# outside ``statuses``): its requests go to the app at once, not one after another behind the fill lock
# (Varnish's hit-for-pass). Not an entry: a cachemw that does not know it decodes it as a foreign value.
PASS_MARKER = b"CMP\x01"


def is_pass_marker(data: bytes | None) -> bool:
    return data == PASS_MARKER


class EntryDecodeError(ValueError):
    """The bytes are not an entry this version of cachemw wrote."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored response, headers ready to replay (ETag and Content-Length included)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    stored_at: float
    etag: bytes
    tags: tuple[str, ...] = ()


_ENTRY = alloc(sys.getsizeof(Entry(200, (), b"", 0.0, b""))) + 32  # the record and its stored_at float
_PAIR = tuple_cost(2)  # a (name, value) header


def entry_cost(entry: Entry) -> int:
    """Bytes a decoded entry holds in this process: its record, header tuples, bytes and tag strings.

    Computed when an entry is kept (L1, decode memo, fill queue), never on a hit.
    """
    headers = entry.headers
    size = _ENTRY + bytes_cost(entry.body) + bytes_cost(entry.etag) + tuple_cost(len(headers)) + _PAIR * len(headers)
    for name, value in headers:
        size += bytes_cost(name) + bytes_cost(value)
    if entry.tags:
        size += tuple_cost(len(entry.tags)) + sum(str_cost(tag) for tag in entry.tags)
    return size


class DecodedMemo:
    """Recently decoded entries by their stored bytes, so a hot entry is decoded once, not per hit.

    Bounded in bytes as the process holds them (the stored bytes as key, and the decoded
    entry, whose body is a copy): emptied when the next entry would not fit. A hit is
    ``entries.get(data)`` on a plain dict (which stays the same object), so a caller may
    keep ``entries`` at hand.
    """

    __slots__ = ("bytes_used", "entries", "max_bytes", "max_entry_bytes")

    def __init__(self, max_bytes: int = 4 * 1024 * 1024, max_entry_bytes: int = 64 * 1024) -> None:
        self.entries: dict[bytes, Entry] = {}
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes  # larger stored values are decoded on every hit
        self.bytes_used = 0

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, data: bytes, entry: Entry) -> None:
        if len(data) > self.max_entry_bytes:
            return
        size = DICT_SLOT + bytes_cost(data) + entry_cost(entry)
        if self.bytes_used + size > self.max_bytes:
            self.entries.clear()
            self.bytes_used = 0
        if size <= self.max_bytes:
            self.entries[data] = entry
            self.bytes_used += size


def encode_entry(entry: Entry, *, ttl: float = 0.0, stale_while_revalidate: float = 0.0) -> bytes:
    """Raises ValueError for an entry the format cannot hold (such a response is not stored).

    ``ttl`` and ``stale_while_revalidate``: the policy it is stored under, which a soft
    purge needs to make it stale (0: it cannot be served stale, a soft purge drops it).
    """
    if len(entry.headers) > MAX_HEADERS:
        raise ValueError("too many headers to store")
    try:
        return _encode(entry, ttl, stale_while_revalidate)
    except struct.error as exc:
        raise ValueError(f"entry cannot be stored: {exc}") from None


def _encode(entry: Entry, ttl: float, stale_while_revalidate: float) -> bytes:
    parts = [
        _HEAD.pack(_MAGIC, VERSION, entry.stored_at, entry.status, len(entry.headers), len(entry.tags),
                   len(entry.body), ttl, stale_while_revalidate),
        _LEN1.pack(len(entry.etag)),
        entry.etag,
    ]
    pack2 = _LEN2.pack
    for name, value in entry.headers:
        parts += (pack2(len(name), len(value)), name, value)  # one extend, not three appends: once per fill
    for tag in entry.tags:
        raw = tag.encode()
        parts += (_LEN1.pack(len(raw)), raw)
    parts.append(entry.body)
    return b"".join(parts)


def decode_entry(data: bytes) -> Entry:
    try:
        magic, version, stored_at, status, n_headers, n_tags, body_len = _HEAD_V1.unpack_from(data, 0)
        if magic != _MAGIC:
            raise EntryDecodeError("not a cachemw entry")
        if version == VERSION:
            ttl, stale_while_revalidate = _WINDOWS.unpack_from(data, WINDOWS_OFFSET)
            if not (0 <= ttl < math.inf and 0 <= stale_while_revalidate < math.inf):
                raise EntryDecodeError("implausible entry header")
            offset = _HEAD.size
        elif version == _V1:
            offset = _HEAD_V1.size
        else:
            raise EntryDecodeError(f"entry format version {version}, expected {VERSION}")
        if not 100 <= status <= 599 or n_headers > MAX_HEADERS or not math.isfinite(stored_at):
            raise EntryDecodeError("implausible entry header")
        (etag_len,) = _LEN1.unpack_from(data, offset)
        offset += _LEN1.size
        etag = data[offset : offset + etag_len]
        offset += etag_len
        headers = []
        for _ in range(n_headers):
            name_len, value_len = _LEN2.unpack_from(data, offset)
            offset += _LEN2.size
            name = data[offset : offset + name_len]
            offset += name_len
            headers.append((name, data[offset : offset + value_len]))
            offset += value_len
        tags = []
        for _ in range(n_tags):
            (tag_len,) = _LEN1.unpack_from(data, offset)
            offset += _LEN1.size
            tags.append(data[offset : offset + tag_len].decode())
            offset += tag_len
        body = data[offset:]
    except (struct.error, UnicodeDecodeError, TypeError) as exc:
        raise EntryDecodeError(f"truncated or malformed entry: {exc}") from None
    # Slicing never fails short, so a value cut inside its last header or tag
    # only shows in the total: every declared length must add up to the data.
    if offset + body_len != len(data):
        raise EntryDecodeError("truncated or malformed entry")
    return Entry(status, tuple(headers), body, stored_at, etag, tuple(tags))


def soften(data: bytes, stale_from: float) -> bytes | None:
    """``data`` made stale as of ``stale_from`` (a soft purge), or None where it cannot be served stale: drop it.

    Its ``stored_at`` becomes ``stale_from - ttl`` (unless it is older already), so it is
    served STALE for its ``stale_while_revalidate`` from then on and refreshed once. An
    entry without a stale window, of version 1, a pass marker or foreign bytes: None.
    ``SOFTEN_SCRIPT`` (``cachemw.store.redis_scripts``) does the same in Redis.
    """
    if len(data) < HEAD_SIZE or data[:STORED_AT_OFFSET] != ENTRY_LEADER:
        return None
    (stored_at,) = _STORED_AT.unpack_from(data, STORED_AT_OFFSET)
    ttl, stale_while_revalidate = _WINDOWS.unpack_from(data, WINDOWS_OFFSET)
    if not (stale_while_revalidate > 0 and 0 <= ttl < math.inf):
        return None
    stale = stale_from - ttl
    if stored_at <= stale:
        return data
    return data[:STORED_AT_OFFSET] + _STORED_AT.pack(stale) + data[STORED_AT_OFFSET + _STORED_AT.size:]
