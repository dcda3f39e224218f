"""The API, included under ``api/`` with its own namespace."""

from __future__ import annotations

from django.urls import path  # type: ignore[import-untyped]

from tests.apps.djangoproject import views

app_name = "api"
urlpatterns = [
    path("items/<int:pk>/", views.item, name="item"),
    path("articles/<slug:slug>/", views.ArticleView.as_view(), name="article"),
]
