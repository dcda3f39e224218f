"""Minimal Django settings: no database, no apps; CommonMiddleware for APPEND_SLASH's redirects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.apps.djangoproject.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
DATABASES: dict[str, Any] = {}
USE_TZ = True
# What cachemw.django.asgi_application() and `cachemw routes --django` take as their defaults.
CACHEMW = {"config": str(Path(__file__).with_name("cachemw.toml")), "key_prefix": "djangotest"}
