"""cachemw for Django: ``@cache`` on views (functions or class-based), rules naming the URLconf's routes.

ASGI, in the project's ``asgi.py``::

    import os

    from django.core.asgi import get_asgi_application
    from cachemw.django import asgi_application

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

    application = asgi_application(get_asgi_application())

WSGI, in the project's ``wsgi.py`` (gunicorn, uWSGI, mod_wsgi)::

    import os

    from django.core.wsgi import get_wsgi_application
    from cachemw.django import wsgi_application

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

    application = wsgi_application(get_wsgi_application())

``settings.CACHEMW`` (a dict of ``CacheMiddleware``'s keywords: ``config``,
``redis_url``, ``key_prefix``, ...) gives the defaults; keywords given here win.
Wrapping Django's handler by hand (``cachemw.wsgi.CacheMiddleware(get_wsgi_application())``,
``cachemw.CacheMiddleware(get_asgi_application())``) is the same; these functions
also take an app that is not Django's handler itself (one wrapped in other
middleware), and ``urlconf``. ``cachemw routes --django mysite.settings`` shows the
table this builds.

Data changes invalidate the cache: in an ``AppConfig.ready()``,
``invalidate_on_commit({Product: ["product:{id}"]})`` (or ``settings.CACHEMW_MODEL_TAGS``)
purges the tags of the rows each transaction saved or deleted, after it commits
(``cachemw.orm.django``).
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp

from cachemw.asgi.lifespan import AnswersLifespan
from cachemw.asgi.middleware import CacheMiddleware
from cachemw.frameworks.django import DjangoRoutes, route_table, settings_cachemw
from cachemw.orm.django import DjangoHook, PurgingQuerySet, invalidate_on_commit, serve_purges_through
from cachemw.orm.purger import Purger
from cachemw.wsgi import CacheMiddleware as WSGICacheMiddleware

__all__ = ["DjangoHook", "Purger", "PurgingQuerySet", "asgi_application", "invalidate_on_commit",
           "middleware_options", "route_table", "wsgi_application"]


def middleware_options(**given: Any) -> dict[str, Any]:
    """``settings.CACHEMW`` under the keywords ``given`` (None: not given): the options a Django project's cache
    runs with. A key of ``settings.CACHEMW`` the middleware does not take is a ConfigError naming it."""
    return {**settings_cachemw(), **{name: value for name, value in given.items() if value is not None}}


def asgi_application(app: ASGIApp, *, urlconf: str | None = None, **options: Any) -> CacheMiddleware:
    """Django's ASGI application behind the cache, its policies from the URLconf (default ``ROOT_URLCONF``),
    ``settings.CACHEMW`` for the keywords not given."""
    from django.core.handlers.asgi import ASGIHandler  # type: ignore[import-untyped]

    inner = AnswersLifespan(app) if isinstance(app, ASGIHandler) else app
    middleware = CacheMiddleware(inner, route_table=DjangoRoutes(urlconf), **options)
    serve_purges_through(middleware)  # invalidate_on_commit() hooks purge through this process's cache
    return middleware


def wsgi_application(app: Any, *, urlconf: str | None = None, **options: Any) -> WSGICacheMiddleware:
    """Django's WSGI application behind the cache (``get_wsgi_application()``), as ``asgi_application``."""
    middleware = WSGICacheMiddleware(app, route_table=DjangoRoutes(urlconf, wsgi=True), **options)
    serve_purges_through(middleware)
    return middleware
