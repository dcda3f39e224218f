"""Minimal Django settings: CommonMiddleware for APPEND_SLASH's redirects; the ORM hook tests' models (their
databases are added by tests/orm/test_django.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.apps.djangoproject.urls"
INSTALLED_APPS: list[str] = ["tests.apps.djangoshop"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
DATABASES: dict[str, Any] = {}
USE_TZ = True
# What cachemw.django.asgi_application() and `cachemw routes --django` take as their defaults.
CACHEMW = {"config": str(Path(__file__).with_name("cachemw.toml")), "key_prefix": "djangotest"}
