"""The project's WSGI application behind the cache, as a Django project's own ``wsgi.py`` would write it."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.apps.djangoproject.settings")

from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]

from cachemw.django import wsgi_application

application = wsgi_application(get_wsgi_application())
