"""The WSGI shell: ``from cachemw.wsgi import CacheMiddleware`` for Flask, Django and any PEP 3333 app."""

from __future__ import annotations

from typing import Any

from cachemw.runtime.context import current_cache
from cachemw.runtime.context import invalidate as _invalidate
from cachemw.runtime.supervisor import detach
from cachemw.wsgi.middleware import CacheMiddleware

__all__ = ["CacheMiddleware", "current_wsgi_cache", "detach", "invalidate"]


def current_wsgi_cache() -> CacheMiddleware:
    """The WSGI CacheMiddleware handling the current request (a view's thread)."""
    cache = current_cache()
    if not isinstance(cache, CacheMiddleware):
        raise RuntimeError("cachemw.wsgi: the cache handling this request is not the WSGI CacheMiddleware. "
                           "HINT: in an async handler behind the ASGI middleware, await cachemw.invalidate(...)")
    return cache


def invalidate(*, tags: tuple[str, ...] | list[str] = (), routes: tuple[str, ...] | list[str] = (),
               urls: tuple[str, ...] | list[str] = (), everything: bool = False, soft: bool = False) -> int:
    """``cachemw.invalidate`` for a sync view: drops the entries before it returns; how many were dropped."""
    fields: dict[str, Any] = {"tags": tags, "routes": routes, "urls": urls, "everything": everything, "soft": soft}
    return current_wsgi_cache().call(_invalidate, **fields)
