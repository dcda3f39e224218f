"""Views that count their calls in-process (one uvicorn process serves them); ``/calls/`` shows the counts."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from django.http import HttpResponse, JsonResponse  # type: ignore[import-untyped]
from django.views import View  # type: ignore[import-untyped]

from cachemw import cache

_lock = threading.Lock()
_calls: Counter[str] = Counter()


def _called(name: str) -> int:
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
