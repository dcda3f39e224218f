"""The Flask apps of ``bench/wsgi.py``, built on first access (``gunicorn wsgi_flask:NAME``).

One Flask app, three ways:

- ``cachemw``: ``app.wsgi_app = CacheMiddleware(app.wsgi_app, redis_url=URL)`` and
  ``@cache(ttl="5m")`` on the view (below ``@app.get``), as cachemw's README shows;
- ``flask_caching``: Flask-Caching's ``Cache(app, config={"CACHE_TYPE": "RedisCache",
  "CACHE_REDIS_URL": URL})`` and ``@cache.cached(timeout=300)`` on the view, as its docs show;
- ``uncached``: neither.

Routes: ``/item/<int:item_id>`` (the cached view: 2 ms "database", ~1 KB JSON),
``/fast/<int:item_id>`` (the same body, no sleep, no cache), ``/_ready``.
The Redis URL comes from ``BENCH_REDIS_URL``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import peer_common
import wsgi_common
from flask import Flask, Response

__all__: list[str] = []  # the apps, built on first access


def create(variant: str) -> Any:
    app = Flask("bench_wsgi_flask")
    cached: Callable[[Any], Any]
    if variant == "cachemw":
        from cachemw import cache

        cached = cache(ttl="5m")
    elif variant == "flask_caching":
        from flask_caching import Cache

        flask_cache = Cache(app, config={"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": wsgi_common.redis_url()})
        cached = flask_cache.cached(timeout=300)
    elif variant == "uncached":
        cached = lambda view: view  # noqa: E731
    else:
        raise AttributeError(variant)

    @app.get("/item/<int:item_id>")
    @cached
    def item(item_id: int) -> Response:
        wsgi_common.database("item")
        return Response(wsgi_common.body(item_id), content_type=wsgi_common.CONTENT_TYPE)

    @app.get("/fast/<int:item_id>")
    def fast(item_id: int) -> Response:
        wsgi_common.count("fast")
        return Response(wsgi_common.body(item_id), content_type=wsgi_common.CONTENT_TYPE)

    @app.get("/_ready")
    def ready() -> Response:
        return Response(b"ok", content_type="text/plain")

    if variant == "cachemw":
        from cachemw.wsgi import CacheMiddleware

        app.wsgi_app = CacheMiddleware(app.wsgi_app, redis_url=wsgi_common.redis_url())  # type: ignore[method-assign]
    return app


__getattr__ = peer_common.lazy_apps(globals(), {name: (lambda n=name: create(n))
                                                for name in ("cachemw", "flask_caching", "uncached")})
