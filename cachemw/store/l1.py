"""The per-process L1: hot entries kept in memory for at most a route's ``sync`` bound.

An L1 entry answers as a fresh hit only within ``sync`` seconds of being read from
(or written to) the shared store, and only while this process hears invalidations;
that is what makes the cross-server staleness bound hold even when pub/sub
messages are lost. Where Redis tracks the entry keys for us (``cachemw.store.tracking``),
a write, purge or expiry of a key evicts its copy here by key (``evict``) as soon as
the message arrives, well within ``sync``.

A read that was in flight when an eviction arrived must not put the old copy back:
callers take a ``seq`` ticket before the store read and hand it to ``put``, which
refuses a copy whose key or tags were evicted since (or everything, after ``clear``
or ``lost_sync``). Without it, a GET answered just before a DEL, whose invalidation
the loop handles before the GET's caller resumes, would keep the purged copy for
the whole ``sync``. Past that it is kept only as a last resort: when the shared
store fails, it may answer within the rule's ``stale_if_error`` window.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cachemw.core.entry import Entry, entry_cost
from cachemw.core.keyspace import ALL_TAG
from cachemw.core.sizes import DICT_SLOT, FLOAT, LRU_SLOT, SET, SET_MEMBER, alloc, str_cost

__all__ = ["L1"]


@dataclass(frozen=True, slots=True)
class _Slot:
    entry: Entry
    primary_until: float  # on the monotonic clock
    epoch: int
    size: int


# A slot record, its float and int (28 B), and its place in the LRU; a tag set, its name and its dict slot.
_SLOT = alloc(sys.getsizeof(_Slot(Entry(200, (), b"", 0.0, b""), 0.0, 0, 0))) + FLOAT + alloc(28) + LRU_SLOT
_TAG_SET = SET + DICT_SLOT
# Evicted keys (and tags) remembered for the reads in flight; past this many, the oldest half is forgotten and
# a read older than them all keeps nothing (it would have to outlast this many evictions).
_GONE_RECORDS = 4096


class L1:
    """An LRU of decoded entries, bounded in bytes as the process holds them, indexed by tag for invalidation.

    An entry counts its key, its decoded objects, its slot and its tag-index
    memberships (``cachemw.core.sizes``); a tag set counts itself while it exists.
    """

    def __init__(self, max_bytes: int = 32 * 1024 * 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._by_tag: dict[str, set[str]] = {}
        self._epoch = 0
        self.seq = 0  # bumped by every eviction: the ticket ``put`` compares against
        self._gone_keys: dict[str, int] = {}  # the seq of each key's last eviction (the newest last)
        self._gone_tags: dict[str, int] = {}
        self._floor = 0  # tickets older than this are refused (everything went, or the records were pruned)
        self.bytes_used = 0
        self.hits = 0
        self.misses = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._slots)

    def get(self, key: str) -> Entry | None:
        """The entry if it may answer as if it came from the shared store now."""
        slot = self._slots.get(key)
        if slot is None or slot.epoch != self._epoch or slot.primary_until <= self._clock():
            self.misses += 1
            return None
        # Not contextlib.suppress: this is the hot path. A WSGI request thread reads here too, and
        # the loop's thread may drop the key meanwhile.
        try:  # noqa: SIM105
            self._slots.move_to_end(key)
        except KeyError:
            pass
        self.hits += 1
        return slot.entry

    def last_resort(self, key: str, *, within_sync: bool = False) -> Entry | None:
        """Whatever is kept for the key, however old: for stale-if-error when the store fails.

        ``within_sync``: only a copy that still answers as fresh (a rule without ``stale_if_error`` has not
        agreed to more: past ``sync`` the copy may have been purged by another server meanwhile).
        """
        slot = self._slots.get(key)
        if slot is None or (within_sync and (slot.epoch != self._epoch or slot.primary_until <= self._clock())):
            return None
        return slot.entry

    def put(self, key: str, entry: Entry, sync: float, ticket: int | None = None) -> None:
        """Keep ``entry`` for ``sync`` seconds; ``ticket``: ``seq`` as it was before the store read, so a copy
        evicted while the read was in flight is not kept (None: no read in flight to worry about)."""
        if ticket is not None and ticket != self.seq and self._evicted_since(key, entry, ticket):
            return
        self._remove(key)
        size = _SLOT + str_cost(key) + entry_cost(entry) + SET_MEMBER * len(entry.tags)
        if size > self.max_bytes:
            return
        self._slots[key] = _Slot(entry, self._clock() + sync, self._epoch, size)
        self.bytes_used += size
        for tag in entry.tags:
            keys = self._by_tag.get(tag)
            if keys is None:
                keys = self._by_tag[tag] = set()
                self.bytes_used += _TAG_SET + str_cost(tag)
            keys.add(key)
        # The oldest go first; the new entry last, if the tag sets it opened leave no room for it.
        while self._slots and self.bytes_used > self.max_bytes:
            self._remove(next(iter(self._slots)))

    def _evicted_since(self, key: str, entry: Entry, ticket: int) -> bool:
        if ticket < self._floor or self._gone_keys.get(key, -1) > ticket:
            return True
        gone_tags = self._gone_tags
        return bool(gone_tags) and any(gone_tags.get(tag, -1) > ticket for tag in entry.tags)

    def _note_gone(self, gone: dict[str, int], name: str) -> None:
        gone.pop(name, None)  # re-inserted last: the dict stays ordered by seq
        gone[name] = self.seq
        if len(gone) > _GONE_RECORDS:  # the oldest half goes; a ticket older than what went is refused
            names = list(gone)[: _GONE_RECORDS // 2]
            self._floor = max(self._floor, gone[names[-1]] + 1)
            for old in names:
                del gone[old]

    def evict(self, keys: Sequence[str] | None) -> None:
        """Redis says these keys changed (written, deleted, expired); None: it flushed them all."""
        if keys is None:
            self.clear()
            return
        self.seq += 1
        slots = self._slots
        for key in keys:
            self._note_gone(self._gone_keys, key)
            if key in slots:
                self._remove(key)
                self.dropped += 1

    def drop_tags(self, tags: Sequence[str]) -> None:
        """An invalidation was announced: no entry carrying one of these tags answers again."""
        if ALL_TAG in tags:
            self.clear()
            return
        self.seq += 1
        for tag in tags:
            self._note_gone(self._gone_tags, tag)
            for key in list(self._by_tag.get(tag, ())):
                self._remove(key)  # the emptied tag set goes with its last entry
                self.dropped += 1

    def lost_sync(self) -> None:
        """Invalidations may have been missed: nothing kept so far answers as a hit again."""
        self._epoch += 1
        self._forget_all()

    def _forget_all(self) -> None:
        """No read in flight now may keep what it brings: every ticket taken so far is refused."""
        self.seq += 1
        self._floor = self.seq
        self._gone_keys.clear()
        self._gone_tags.clear()

    def clear(self) -> None:
        self._forget_all()
        self.dropped += len(self._slots)
        self._slots.clear()
        self._by_tag.clear()
        self.bytes_used = 0

    def _remove(self, key: str) -> None:
        slot = self._slots.pop(key, None)
        if slot is None:
            return
        self.bytes_used -= slot.size
        for tag in slot.entry.tags:
            keys = self._by_tag.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_tag[tag]
                    self.bytes_used -= _TAG_SET + str_cost(tag)
