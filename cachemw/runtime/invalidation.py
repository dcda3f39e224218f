"""Invalidation: by tag, by route, by URL, or everything; and what unsafe requests invalidate.

Every entry is indexed under its tags, plus two implicit ones (``route:TEMPLATE``
and ``path:PATH``), so all four kinds of purge are one mechanism. A purge bumps
the tags' generations before it deletes: a fill that began before it sees the
change when it stores and removes itself (no resurrection).

A soft purge (``soft=True``) marks the entries stale instead of deleting them: each
is served STALE within its route's ``stale_while_revalidate`` while one refresh per
key (the fill lock, across servers) replaces it, so purging a hot tag costs the
origin one call per key, not one per server per key. Entries without a stale window
go as in a hard purge. The generations are bumped alike, and the copies in every
process's L1 are dropped alike (the announcement is the same): the next read finds
the stale entry in the shared store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from urllib.parse import unquote, urlsplit

from cachemw.core.keys import path_tag, route_tag
from cachemw.core.keyspace import ALL_TAG, entry_pattern, tag_keys
from cachemw.core.rules import normalise_template
from cachemw.core.tags import FIELD, fill_template
from cachemw.store import Store
from cachemw.store.l1 import L1
from cachemw.store.retrying import within_deadline

__all__ = ["Invalidator", "targets_for_unsafe_request"]

class Invalidator:
    """Purges entries in the shared store and this process's L1; other processes hear it by pub/sub."""

    def __init__(self, store: Store, prefix: str, l1: L1 | None = None,
                 on_local: Callable[[Sequence[str]], None] | None = None, *, timeout: float = 2.0) -> None:
        self.store = store
        self.prefix = prefix
        self.l1 = l1
        # Not the request path's budget: a purge lost to a blip leaves stale entries on every server.
        self.timeout = timeout
        # What else this process drops at once (the middleware's fills in flight), before the store call.
        self._on_local = on_local

    async def tags(self, *tags: str, soft: bool = False) -> int:
        """Drop every entry carrying one of ``tags`` (``soft``: mark it stale); returns how many it touched."""
        wanted = [tag for tag in dict.fromkeys(tags) if tag]
        if not wanted:
            return 0
        if self.l1 is not None:
            self.l1.drop_tags(wanted)
        if self._on_local is not None:
            self._on_local(wanted)
        pairs = [tag_keys(self.prefix, tag) for tag in wanted]
        tag_sets, generations, message = [p[0] for p in pairs], [p[1] for p in pairs], json.dumps(wanted)
        soft_from = _soft_from(soft)  # one time for every retry: entries marked stale as of the call
        return await within_deadline(
            lambda left: self.store.invalidate(tag_sets, generations, message, timeout=left, **soft_from),
            self.timeout)

    async def routes(self, *templates: str, soft: bool = False) -> int:
        """Every entry of these routes (``"/products/{id}"`` as the app declares it)."""
        return await self.tags(*(route_tag(normalise_template(t)) for t in templates), soft=soft)

    async def urls(self, *urls: str, soft: bool = False) -> int:
        """Every entry of these paths, whatever their query string, vary headers or users."""
        # Entries are tagged with the decoded path, as ASGI gives it to the app.
        return await self.tags(*(path_tag(unquote(urlsplit(url).path) or "/") for url in urls), soft=soft)

    async def everything(self, *, soft: bool = False) -> int:
        """Every entry under the key prefix."""
        if self.l1 is not None:
            self.l1.clear()
        if self._on_local is not None:
            self._on_local([ALL_TAG])
        _, generation = tag_keys(self.prefix, ALL_TAG)
        pattern, message = entry_pattern(self.prefix), json.dumps([ALL_TAG])
        soft_from = _soft_from(soft)
        return await within_deadline(
            lambda left: self.store.purge(pattern, generation, message, timeout=left, **soft_from), self.timeout)


def _soft_from(soft: bool) -> dict[str, float]:
    """The store call's ``stale_from`` for a soft purge; nothing for a hard one (a store of the older protocol
    keeps working). Wall-clock time, as entries' ``stored_at`` is written."""
    return {"stale_from": time.time()} if soft else {}


def targets_for_unsafe_request(invalidates: Iterable[str], params: Mapping[str, str],
                               mounted_at: str = "") -> list[str]:
    """The tags a successful unsafe request invalidates, from a rule's ``invalidates`` templates.

    ``"/products/{id}"`` is a path: with every parameter known it names that path,
    otherwise the whole route. Anything else is a tag template (``"product:{id}"``);
    one naming a parameter the request lacks is skipped rather than guessed.

    A path is written as the app's routes see it; ``mounted_at`` is what comes before it
    in the request's path (``cachemw.core.keys.mounted_at``: the server's ``--root-path``, an
    outer mount's prefix), as in the path the entries were tagged with.
    """
    tags: list[str] = []
    for template in invalidates:
        names = FIELD.findall(template)
        known = all(name in params for name in names)
        if template.startswith("/"):
            if known:
                tags.append(path_tag(mounted_at + fill_template(template, params)))
            else:
                tags.append(route_tag(normalise_template(template)))
        elif known:
            tags.append(fill_template(template, params))
    return tags


def format_tags(templates: Sequence[str], params: Mapping[str, str]) -> tuple[str, ...]:
    """A rule's ``tags`` for one request; a template naming an unknown parameter is kept as written."""
    return tuple(fill_template(t, params) if all(n in params for n in FIELD.findall(t)) else t for t in templates)
