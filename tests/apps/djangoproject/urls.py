"""The project's URLconf: an include() of a module, an include() of a list under a converter, a re_path."""

from __future__ import annotations

from django.urls import include, path, re_path  # type: ignore[import-untyped]

from tests.apps.djangoproject import views

urlpatterns = [
    path("api/", include("tests.apps.djangoproject.api_urls")),
    path("shops/<slug:shop>/", include([path("items/<int:pk>/", views.item, name="shop-item")])),
    path("plain/", views.plain, name="plain"),
    re_path(r"^archive/(?P<year>[0-9]{4})/$", views.archive, name="archive"),
    path("calls/", views.calls, name="calls"),
    path("ready", views.ready),
]
