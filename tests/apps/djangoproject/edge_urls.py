"""A URLconf of the cases the rule table must not get wrong: i18n_patterns(), a view with its own HEAD,
a regex with an unnamed group, two patterns of one route string."""

from __future__ import annotations

from typing import Any

from django.conf.urls.i18n import i18n_patterns  # type: ignore[import-untyped]
from django.http import JsonResponse  # type: ignore[import-untyped]
from django.urls import path, re_path  # type: ignore[import-untyped]
from django.views import View  # type: ignore[import-untyped]

from cachemw import cache


@cache(ttl="5m")
def page(request: Any, **kwargs: Any) -> Any:
    return JsonResponse(kwargs)


@cache(ttl="5m")
class WithHead(View):  # type: ignore[misc]
    def get(self, request: Any) -> Any:
        return JsonResponse({})

    def head(self, request: Any) -> Any:
        return JsonResponse({})


def other(request: Any) -> Any:
    return JsonResponse({})


urlpatterns = [
    path("headed/", WithHead.as_view()),
    re_path(r"^pages/(\d+)/$", page),
    path("same/", page, name="first"),
    path("same/", other, name="second"),  # never reached: Django resolves the first
    path("cached-fn/", cache(ttl="1m")(WithHead.as_view())),  # @cache on the view function as_view() gave
    *i18n_patterns(path("about/", page, name="about")),
]
