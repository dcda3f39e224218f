"""cachemw for Django: ``@cache`` on views (functions or class-based), rules naming the URLconf's routes.

ASGI, in the project's ``asgi.py``::

    from django.core.asgi import get_asgi_application
    from cachemw.django import asgi_application

    application = asgi_application(get_asgi_application())

``settings.CACHEMW`` (a dict of ``CacheMiddleware``'s keywords: ``config``,
``redis_url``, ``key_prefix``, ...) gives the defaults; keywords given here win.
``cachemw routes --django mysite.settings`` shows the table this builds.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from cachemw.asgi.middleware import CacheMiddleware
from cachemw.core.policy import ConfigError
from cachemw.frameworks.django import route_table

__all__ = ["asgi_application", "middleware_options", "route_table"]

# WSGI: the WSGI shell's CacheMiddleware is re-exported here, next to asgi_application.


def middleware_options(**given: Any) -> dict[str, Any]:
    """``settings.CACHEMW`` under the keywords ``given``; a key ``CacheMiddleware`` does not take is a ConfigError."""
    from django.conf import settings  # type: ignore[import-untyped]

    configured = getattr(settings, "CACHEMW", None) or {}
    if not isinstance(configured, Mapping):
        raise ConfigError(f"Django setting CACHEMW: expected a dict of CacheMiddleware keywords, got "
                          f"{type(configured).__name__}")
    known = sorted(set(inspect.signature(CacheMiddleware).parameters) - {"app", "route_table"})
    unknown = sorted(str(key) for key in configured if key not in known)
    if unknown:
        raise ConfigError(f"Django setting CACHEMW: unknown key {unknown[0]!r}; the keys are: {', '.join(known)}")
    return {**configured, **given}


def asgi_application(app: ASGIApp, *, urlconf: str | None = None, **options: Any) -> CacheMiddleware:
    """Django's ASGI application behind the cache, its policies from the URLconf (default ``ROOT_URLCONF``)."""
    from django.core.handlers.asgi import ASGIHandler  # type: ignore[import-untyped]

    inner = _AnswersLifespan(app) if isinstance(app, ASGIHandler) else app
    return CacheMiddleware(inner, route_table=lambda settings: route_table(settings, urlconf),
                           **middleware_options(**options))


class _AnswersLifespan:
    """Django's handler refuses the ASGI lifespan (a ValueError); this answers it instead, so the cache's
    supervisor runs for the server's lifetime and drains at shutdown, as in front of a Starlette app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
