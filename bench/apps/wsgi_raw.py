"""A bare PEP 3333 callable with a constant ~1 KB JSON body: what gunicorn itself serves per second
(``gunicorn wsgi_raw:app``), the ceiling every WSGI app of ``bench/wsgi.py`` is under."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import peer_common

BODY = peer_common.payload_bytes(0)
HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(BODY)))]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", HEADERS)
    return [BODY]
