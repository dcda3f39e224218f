"""PEP 3333 environs as the HTTP scopes the core keys on, and back; ASGI response messages as WSGI responses.

The scope is built exactly as an ASGI server (uvicorn) builds it for the same
request, so a Flask server and a FastAPI server of one site compute the same keys
and share their entries.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from http import HTTPStatus
from typing import Any

__all__ = ["environ_for", "route_of", "scope_of", "status_line", "wsgi_headers"]

_SPECIAL = {"CONTENT_TYPE": b"content-type", "CONTENT_LENGTH": b"content-length"}
# Header names as ASGI spells them, by their CGI names: the same few dozen on every request. Bounded,
# as clients choose the names.
_HEADER_NAMES: dict[str, bytes] = {}
_HEADER_NAMES_KEPT = 512
_STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}


def _text(raw: str) -> str:
    """A WSGI string (the request's bytes as latin-1) as the UTF-8 text an ASGI server decodes it to."""
    return raw if raw.isascii() else raw.encode("latin-1").decode("utf-8", "replace")


def route_of(environ: Mapping[str, Any]) -> dict[str, Any]:
    """What routing reads (path, root path, method): all a request of a route without a policy costs us."""
    root_path = _text(environ.get("SCRIPT_NAME", ""))
    return {"path": root_path + _text(environ.get("PATH_INFO", "")), "root_path": root_path,
            "method": environ.get("REQUEST_METHOD", "GET").upper()}


def scope_of(environ: Mapping[str, Any], route: dict[str, Any]) -> dict[str, Any]:
    """The HTTP scope of this request (headers lowercased bytes, path decoded, root path included).

    ``route``: ``route_of(environ)``, extended in place into the scope.
    """
    headers: list[tuple[bytes, bytes]] = []
    names = _HEADER_NAMES
    for name, value in environ.items():
        if name.startswith("HTTP_"):
            header = names.get(name)
            if header is None:
                header = name[5:].replace("_", "-").lower().encode("latin-1")
                if len(names) < _HEADER_NAMES_KEPT:
                    names[name] = header
            headers.append((header, value.encode("latin-1")))
        elif name in _SPECIAL and value:
            headers.append((_SPECIAL[name], value.encode("latin-1")))
    protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
    scope = route
    scope.update({
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": protocol[5:] if protocol.startswith("HTTP/") else "1.1",
        "scheme": environ.get("wsgi.url_scheme", "http"),
        "query_string": environ.get("QUERY_STRING", "").encode("latin-1"),
        "headers": headers,
        "server": (environ.get("SERVER_NAME", ""), _port(environ.get("SERVER_PORT"))),
    })
    if "REMOTE_ADDR" in environ:
        scope["client"] = (environ["REMOTE_ADDR"], _port(environ.get("REMOTE_PORT")))
    return scope


def _port(value: object) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def environ_for(scope: Mapping[str, Any], base: Mapping[str, Any], *, bodiless: bool = False) -> dict[str, Any]:
    """``base`` as ``scope`` says the app must see it: its method, query string and headers only.

    The cache may hand the app a narrower request than the client sent (a normalised
    query string; no unkeyed override headers; for a refresh, only the headers of the
    key). ``bodiless``: a request nobody sent (a refresh), with an empty body.
    """
    environ: MutableMapping[str, Any] = {name: value for name, value in base.items()
                                         if not name.startswith("HTTP_") and name not in _SPECIAL}
    for name, value in scope.get("headers", ()):
        text = name.decode("latin-1")
        key = "CONTENT_TYPE" if text == "content-type" else "CONTENT_LENGTH" if text == "content-length" \
            else "HTTP_" + text.upper().replace("-", "_")
        decoded = value.decode("latin-1")
        environ[key] = f"{environ[key]},{decoded}" if key in environ and key.startswith("HTTP_") else decoded
    environ["REQUEST_METHOD"] = scope["method"]
    environ["QUERY_STRING"] = scope.get("query_string", b"").decode("latin-1")
    if bodiless:
        environ["wsgi.input"] = io.BytesIO(b"")
        environ["wsgi.errors"] = base.get("wsgi.errors", sys.stderr)
        environ.pop("CONTENT_LENGTH", None)
        environ.pop("CONTENT_TYPE", None)
    return dict(environ)


def status_line(status: int) -> str:
    line = _STATUS_LINES.get(status)
    return line if line is not None else f"{status} Unknown"


def wsgi_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]
