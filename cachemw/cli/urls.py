"""URLs and headers as an operator types them, turned into what the app sees: ``inspect`` and ``warm`` share them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from cachemw.cli.common import CommandFailed

__all__ = ["request_scope", "split_header"]

_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
_QUERY_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "#")


def split_header(raw: str) -> tuple[str, str]:
    """``-H 'Name: value'`` as name and value, stripped; a name that is no HTTP token fails before any request."""
    name, colon, value = raw.partition(":")
    name = name.strip()
    if not colon or not name or not set(name.lower()) <= _TOKEN:
        raise CommandFailed(f"-H {raw!r}: expected a header as 'Name: value'")
    return name, value.strip()


def request_scope(url: str, extra_headers: Sequence[str]) -> dict[str, Any]:
    """The ASGI scope of ``GET url`` as a server gives it to the app (path decoded, Host from the URL)."""
    split = urlsplit(url)
    scheme = split.scheme.lower()
    if scheme not in ("http", "https") or not split.hostname:
        raise CommandFailed(f"{url!r} is not an absolute http(s) URL, e.g. http://example.com/products/1")
    try:
        port = split.port
    except ValueError:
        raise CommandFailed(f"{url!r}: the port is not a number from 0 to 65535") from None
    headers: list[tuple[bytes, bytes]] = []
    for raw in extra_headers:
        name, value = split_header(raw)
        try:
            headers.append((name.lower().encode("ascii"), value.encode("latin-1")))
        except UnicodeEncodeError:
            raise CommandFailed(f"-H {raw!r}: a header value must be latin-1 text") from None
    if not any(name == b"host" for name, _ in headers):
        # As HTTP clients send it: no userinfo, no default port.
        host = split.netloc.rpartition("@")[2].lower()
        if port is not None and port == (80 if scheme == "http" else 443):
            port = None
            host = host[: host.rfind(":")]
        try:
            host_bytes = host.encode("ascii")
        except UnicodeEncodeError:  # an international domain name, as clients send it
            try:
                host_bytes = split.hostname.encode("idna") + (b"" if port is None else f":{port}".encode())
            except UnicodeError:
                raise CommandFailed(f"{url!r}: {split.hostname!r} is not a valid host name") from None
        headers.insert(0, (b"host", host_bytes))
    raw_path = quote(split.path or "/", safe=_QUERY_SAFE)
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": scheme,
        "path": unquote(split.path) or "/",
        "raw_path": raw_path.encode("ascii"),
        "root_path": "",
        "query_string": quote(split.query, safe=_QUERY_SAFE).encode("ascii"),
        "headers": headers,
        "client": None,
        "server": None,
    }

