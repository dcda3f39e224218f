"""What to do with a request, as a value: the decisions both shells dispatch on.

Pure functions over plain facts (the method, the policy, who the request is for,
what the store answered, ``now``), returning a ``Step`` (and, where one is due,
the ``Cache-Status`` reason of a bypass). Nothing here raises to steer, waits,
or does I/O: the ASGI and WSGI shells carry out the step, so the two cannot
decide differently, and every rule is tested without an event loop.
"""

from __future__ import annotations

import enum

from cachemw.core import http
from cachemw.core.policy import Freshness, Policy, freshness

__all__ = ["Step", "after_origin", "after_wait", "for_entry", "for_method", "for_request", "for_stored"]

CACHED_METHODS = frozenset({"GET", "HEAD"})
# Only these may invalidate: OPTIONS (a CORS preflight anyone can send), TRACE and
# unknown methods are passed through untouched, never cached and never purging.
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Step(enum.Enum):
    """One thing the shell does next."""

    LOOK_UP = "look up"  # a cacheable request: compute the key and read the store
    INVALIDATE = "invalidate"  # an unsafe method on a route that declares what it makes stale
    BYPASS = "bypass"  # forward untouched, store nothing (the reason goes with it)
    SERVE = "serve"  # a fresh entry answers
    SERVE_STALE = "serve stale"  # a stale entry answers now and one refresh starts in the background
    SERVE_FALLBACK = "serve fallback"  # the store or the origin failed: an entry within stale_if_error answers
    FILL = "fill"  # nothing usable: the origin answers, its response is stored
    FILL_WITH_FALLBACK = "fill with fallback"  # as FILL, with an entry to answer if the origin fails
    SHARE = "share"  # the fill waited on succeeded: its entry answers
    REPLAY_FAILURE = "replay failure"  # the fill waited on got a 5xx: that answer is shared
    FAIL = "fail"  # the fill waited on raised: the request fails too, the origin is not called again
    FORWARD = "forward"  # the origin answers, its response is not stored (generations unknown)


# The hits' steps as module globals: an Enum class's attribute goes through its metaclass (CPython 3.11:
# ~930 instructions a read under callgrind, against a handful for a global), and every request reads these.
_LOOK_UP = Step.LOOK_UP
_SERVE = Step.SERVE


def for_method(method: str, policy: Policy) -> tuple[Step, bytes]:
    """By the method and the route's policy: look up, invalidate, or bypass (with its Cache-Status)."""
    if method in CACHED_METHODS:
        if policy.cacheable:
            return _LOOK_UP, b""
        return Step.BYPASS, http.STATUS_BYPASS
    if method.upper() in UNSAFE_METHODS:  # h11 passes a lowercase method through; apps upper it
        return (Step.INVALIDATE, b"") if policy.invalidating else (Step.BYPASS, http.STATUS_BYPASS_METHOD)
    return Step.BYPASS, http.STATUS_BYPASS_METHOD


def for_request(policy: Policy, identity: str | None, credentials: str | None, has_body: bool) -> bytes | None:
    """Why a cacheable route's request must bypass the cache (its Cache-Status), or None to look it up.

    A ``private`` route needs someone to key on; a shared one never answers, nor
    stores, a request that carries credentials; a request body the key cannot
    cover is not ours to answer.
    """
    if policy.private:
        if identity is None:
            return http.STATUS_BYPASS_REQUEST
    elif identity is not None or credentials is not None:
        return http.STATUS_BYPASS_REQUEST
    if has_body:
        return http.STATUS_BYPASS_REQUEST
    return None


def for_entry(stored_at: float, policy: Policy, now: float) -> Step:
    """What a found entry (the store answered) allows: serve it, serve it stale, or fill (with it as fallback)."""
    if now - stored_at < policy.ttl:  # fresh (``freshness``'s first case): a hit's answer without another call
        return _SERVE
    state = freshness(stored_at, policy, now)
    if state is Freshness.FRESH:
        return Step.SERVE
    if state is Freshness.STALE:
        return Step.SERVE_STALE
    if state is Freshness.STALE_IF_ERROR:
        return Step.FILL_WITH_FALLBACK
    return Step.FILL


def for_stored(stored_at: float | None, policy: Policy, now: float, store_failed: bool) -> Step:
    """The step after a lookup: ``stored_at`` of the entry found (None: nothing usable), and whether the store failed.

    With the store failing, any entry still within ``stale_if_error`` (the L1's last
    copy included) answers: the origin is spared while the store is down.
    """
    if stored_at is None:
        return Step.FILL
    if now - stored_at < policy.ttl and not store_failed:  # a hit, as for_entry would say, without its call
        return _SERVE
    step = for_entry(stored_at, policy, now)
    if store_failed and step is not Step.FILL:
        return Step.SERVE_FALLBACK
    return step


def after_wait(done: bool, shared: bool, failed: bool, has_fallback: bool, has_failure: bool, raised: bool) -> Step:
    """After waiting on another request's fill of the key: share its outcome, or forward on our own.

    A failure is shared as well (its 5xx, or its exception): a failing origin is called
    once for the herd, not once per request. The stale entry, if any, comes first.
    """
    if not done:
        return Step.FORWARD  # waited past the bound: the origin answers, nothing is stored
    if shared:
        return Step.SHARE
    if failed:
        if has_fallback:
            return Step.SERVE_FALLBACK
        if has_failure:
            return Step.REPLAY_FAILURE
        if raised:
            return Step.FAIL
    return Step.FORWARD


def after_origin(failure: str | None, has_fallback: bool) -> Step:
    """After the origin's call: its failure (``"status"``, ``"exception"``, ``"timeout"``) with a fallback
    answers from the fallback; otherwise what the origin sent stands (FILL: stored if storable)."""
    if failure is not None and has_fallback:
        return Step.SERVE_FALLBACK
    return Step.FILL
