"""The project's ASGI application behind the cache, as a Django project's own ``asgi.py`` would write it."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.apps.djangoproject.settings")

from django.core.asgi import get_asgi_application  # type: ignore[import-untyped]

from cachemw.django import asgi_application

application = asgi_application(get_asgi_application())
