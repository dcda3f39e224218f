"""The Django apps of ``bench/wsgi.py``, built on first access (``gunicorn wsgi_django:NAME``).

A minimal Django project in one module (``settings.configure()``: no installed apps,
no middleware, this module as ``ROOT_URLCONF``), one view, three ways:

- ``cachemw``: ``application = CacheMiddleware(get_wsgi_application(), redis_url=URL)``
  and ``@cache(ttl="5m")`` on the view;
- ``cache_page``: ``cache_page(300)`` on the view, ``CACHES`` on
  ``django.core.cache.backends.redis.RedisCache`` at the same kind of private Redis;
- ``uncached``: neither.

Routes: ``item/<int:item_id>`` (2 ms "database", ~1 KB JSON), ``fast/<int:item_id>``
(no sleep, no cache), ``_ready``. One process builds one of them (Django's settings
are process-wide): gunicorn imports this module and asks for one name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import peer_common
import wsgi_common

__all__: list[str] = []  # the apps, built on first access

urlpatterns: list[Any] = []  # filled by create(): this module is the ROOT_URLCONF


def create(variant: str) -> Any:
    if variant not in ("cachemw", "cache_page", "uncached"):
        raise AttributeError(variant)
    from django.conf import settings

    caches: dict[str, Any] = {"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}
    if variant == "cache_page":
        caches = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                              "LOCATION": wsgi_common.redis_url()}}
    settings.configure(DEBUG=False, SECRET_KEY="bench-wsgi-not-secret", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__,
                       INSTALLED_APPS=[], MIDDLEWARE=[], CACHES=caches, USE_TZ=True, USE_I18N=False)
    from django.http import HttpRequest, HttpResponse
    from django.urls import path

    cached: Callable[[Any], Any]
    if variant == "cachemw":
        from cachemw import cache

        cached = cache(ttl="5m")
    elif variant == "cache_page":
        from django.views.decorators.cache import cache_page

        cached = cache_page(300)
    else:
        cached = lambda view: view  # noqa: E731

    @cached
    def item(request: HttpRequest, item_id: int) -> HttpResponse:
        wsgi_common.database("item")
        return HttpResponse(wsgi_common.body(item_id), content_type=wsgi_common.CONTENT_TYPE)

    def fast(request: HttpRequest, item_id: int) -> HttpResponse:
        wsgi_common.count("fast")
        return HttpResponse(wsgi_common.body(item_id), content_type=wsgi_common.CONTENT_TYPE)

    def ready(request: HttpRequest) -> HttpResponse:
        return HttpResponse(b"ok", content_type="text/plain")

    urlpatterns[:] = [path("item/<int:item_id>", item), path("fast/<int:item_id>", fast), path("_ready", ready)]
    from django.core.wsgi import get_wsgi_application

    application = get_wsgi_application()
    if variant == "cachemw":
        from cachemw.wsgi import CacheMiddleware

        return CacheMiddleware(application, redis_url=wsgi_common.redis_url())
    return application


__getattr__ = peer_common.lazy_apps(globals(), {name: (lambda n=name: create(n))
                                                for name in ("cachemw", "cache_page", "uncached")})
