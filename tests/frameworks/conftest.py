"""Django, set up once per test process with the test project's settings (Django's settings are global)."""

from __future__ import annotations

import os

import django  # type: ignore[import-untyped]
import pytest

DJANGO_SETTINGS = "tests.apps.djangoproject.settings"


@pytest.fixture(scope="session", autouse=True)
def django_project() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", DJANGO_SETTINGS)
    django.setup()
