"""Views that count their calls in-process (one uvicorn process serves them); ``/calls/`` shows the counts."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

import redis
from django.http import HttpResponse, JsonResponse  # type: ignore[import-untyped]
from django.views import View  # type: ignore[import-untyped]
from django.views.decorators.csrf import csrf_exempt  # type: ignore[import-untyped]

import cachemw.wsgi
from cachemw import cache

_lock = threading.Lock()
_COUNTS = redis.Redis.from_url(os.environ["DJANGO_COUNTS_URL"]) if os.environ.get("DJANGO_COUNTS_URL") else None
_calls: Counter[str] = Counter()


def _called(name: str) -> int:
    if _COUNTS is not None:  # several worker processes (gunicorn): counted where a test can see them all
        return int(_COUNTS.incr(f"calls:{name}"))
    with _lock:
        _calls[name] += 1
        return _calls[name]


@cache("minutes", tags=["item:{pk}"])
def item(request: Any, pk: int, shop: str | None = None) -> Any:
    return JsonResponse({"pk": pk, "shop": shop, "call": _called(f"item:{shop}:{pk}")})


@cache(ttl="5m")
class ArticleView(View):  # type: ignore[misc]
    def get(self, request: Any, slug: str) -> Any:
        return JsonResponse({"slug": slug, "call": _called(f"article:{slug}")})


def plain(request: Any) -> Any:
    return JsonResponse({"call": _called("plain")})


def archive(request: Any, year: str) -> Any:
    return JsonResponse({"year": year, "call": _called(f"archive:{year}")})


def calls(request: Any) -> Any:
    with _lock:
        return JsonResponse(dict(_calls))


def ready(request: Any) -> Any:
    return HttpResponse("ok")


# What the WSGI tests (real gunicorn workers) use besides the views above.

@cache(ttl="5m")
def slow(request: Any, n: int) -> Any:
    call = _called("slow")
    time.sleep(0.3)  # a slow database read: concurrent requests arrive while it runs
    return JsonResponse({"n": n, "call": call})


@cache(ttl="5m", private=True)
def me(request: Any) -> Any:
    _called("me")
    return JsonResponse({"user": request.headers.get("Authorization", "nobody")})


@cache(ttl="5m")
def feed(request: Any) -> Any:
    return JsonResponse({"auth": request.headers.get("Authorization"), "call": _called("feed")})


@csrf_exempt  # type: ignore[untyped-decorator]
def change(request: Any, pk: int) -> Any:
    """A write: the item's entries go, from a sync view, before the answer."""
    return JsonResponse({"dropped": cachemw.wsgi.invalidate(tags=[f"item:{pk}"])})
