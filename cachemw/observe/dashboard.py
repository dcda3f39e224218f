"""An opt-in live dashboard: mount ``dashboard_app()`` in the cached app, e.g. at ``/_cachemw``.

    app.mount("/_cachemw", dashboard_app())          # inside the app with CacheMiddleware

One HTML page and a small script (``cachemw/static``, no build step, nothing
loaded from elsewhere) poll ``api/state``: the rule table with each route's policy
and hit ratio, a chart of HIT/STALE/MISS/BYPASS over the last minutes, the
background queue, write-behind backlogs, the store's health. Each cached route
has a purge button, and a form purges a tag (``POST api/purge``).

Access: every endpoint asks ``allow(request)``, by default ``loopback_only``
(clients on 127.0.0.0/8 or ::1, and no proxy headers); purges ask ``allow_purge``
(default: ``allow``) and must carry the ``X-Cachemw-Purge: 1`` header the page
sends, with no cross-site ``Origin``: a cross-site form, link or image cannot
purge. Behind a reverse proxy on the same host every client looks local; the
proxy headers it adds are what makes ``loopback_only`` refuse them, so pass your
own check (an admin session, a token) if the dashboard must be reached through it.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import json
from collections.abc import Awaitable, Callable
from importlib import resources
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from cachemw.core.keys import route_tag
from cachemw.core.rules import normalise_template
from cachemw.observe.snapshot import CacheSource, full_snapshot, history, observed, resolve_cache, sample_history
from cachemw.runtime.shell import CacheShell
from cachemw.store import StoreError

__all__ = ["PURGE_HEADER", "dashboard_app", "loopback_only"]

PURGE_HEADER = "x-cachemw-purge"
_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
_MAX_TAG = 512
_PURGE_SHAPE = 'expected a JSON object: {"tag": "product:1"} or {"route": "/products/{id}"}'
_SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
}

Check = Callable[[Request], "bool | Awaitable[bool]"]


def loopback_only(request: Request) -> bool:
    """True for a client on this machine (127.0.0.0/8, ::1) that no proxy relays, asking for a loopback host.

    The ``Host`` check keeps out DNS rebinding: a page of ``evil.example`` whose name
    now resolves to 127.0.0.1 reaches us from a loopback address, but names its own host.
    """
    if any(name in request.headers for name in _PROXY_HEADERS):
        return False  # a proxy on this host relays someone else
    host = request.headers.get("host")
    if host is not None and not _is_loopback_host(urlsplit("//" + host).hostname or ""):
        return False
    client = request.client
    return client is not None and _is_loopback_host(client.host)


def _is_loopback_host(name: str) -> bool:
    if name.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


@functools.cache
def _static(name: str) -> bytes:
    return (resources.files("cachemw") / "static" / name).read_bytes()


def dashboard_app(cache: CacheSource = None, *, allow: Check = loopback_only, allow_purge: Check | None = None,
                  ) -> Starlette:
    """The dashboard as an ASGI app to mount inside the app whose cache it shows.

    ``cache`` is the CacheMiddleware or a function returning it; by default the one
    handling the request. ``allow(request)`` (sync or async) guards every endpoint,
    ``allow_purge(request)`` the purges (default: ``allow``).
    """
    endpoints = _Endpoints(cache, allow, allow if allow_purge is None else allow_purge)
    return Starlette(routes=[
        Route("/", endpoints.page, methods=["GET"]),
        Route("/dashboard.js", endpoints.script, methods=["GET"]),
        Route("/api/state", endpoints.state, methods=["GET"]),
        Route("/api/purge", endpoints.purge, methods=["POST"]),
    ])


class _Endpoints:
    """The dashboard's endpoints, sharing what ``dashboard_app`` was given."""

    def __init__(self, cache: CacheSource, allow: Check, purge_check: Check) -> None:
        self.cache = cache
        self.allow = allow
        self.purge_check = purge_check

    async def page(self, request: Request) -> Response:
        if not await _allowed(request, self.allow):
            return PlainTextResponse("forbidden\n", status_code=403, headers=_SECURITY_HEADERS)
        return Response(_static("dashboard.html"), media_type="text/html; charset=utf-8", headers=_SECURITY_HEADERS)

    async def script(self, request: Request) -> Response:
        if not await _allowed(request, self.allow):
            return PlainTextResponse("forbidden\n", status_code=403, headers=_SECURITY_HEADERS)
        return Response(_static("dashboard.js"), media_type="text/javascript; charset=utf-8",
                        headers=_SECURITY_HEADERS)

    async def state(self, request: Request) -> Response:
        if not await _allowed(request, self.allow):
            return _forbidden("not allowed")
        found = _find(self.cache, request)
        if isinstance(found, Response):
            return found
        sample_history(found)  # without the history service, polling alone keeps the chart going
        data = {
            "snapshot": await full_snapshot(found),
            "history": history(found),
            "interval": observed(found).history_interval,
            "can_purge": await _allowed(request, self.purge_check),
        }
        return Response(json.dumps(data), media_type="application/json", headers=_SECURITY_HEADERS)

    async def purge(self, request: Request) -> Response:
        if not await _allowed(request, self.allow) or not await _allowed(request, self.purge_check):
            return _forbidden("not allowed to purge")
        refusal = _cross_site(request)
        if refusal is not None:
            return _forbidden(refusal)
        try:
            target = json.loads(await request.body())
        except ValueError:
            target = None
        if not isinstance(target, dict) or len(target) != 1:
            return _bad(_PURGE_SHAPE)
        found = _find(self.cache, request)
        if isinstance(found, Response):
            return found
        invalidator = found.invalidator
        if invalidator is None:
            return JSONResponse({"error": "the cache has not started"}, status_code=503, headers=_SECURITY_HEADERS)
        [(kind, value)] = target.items()
        tags = _purged_tags(found, kind, value)
        if isinstance(tags, Response):
            return tags
        try:
            dropped = await invalidator.tags(*tags)
        except StoreError as exc:
            return JSONResponse({"error": f"the store did not answer: {exc}"}, status_code=502,
                                headers=_SECURITY_HEADERS)
        return JSONResponse({"dropped": dropped, kind: value}, headers=_SECURITY_HEADERS)


async def _allowed(request: Request, check: Check) -> bool:
    verdict = check(request)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    return verdict is True


def _purged_tags(found: CacheShell, kind: object, value: object) -> list[str] | Response:
    """The tags a purge of ``{kind: value}`` drops, or the 400 answer saying why it names none."""
    if kind == "tag" and isinstance(value, str) and 0 < len(value.strip()) <= _MAX_TAG:
        return [value.strip()]
    if kind == "route" and isinstance(value, str):
        known = {normalise_template(rule.template) for rule in (found.table.rules if found.table else ())
                 if rule.policy is not None}
        if normalise_template(value) not in known:
            return _bad(f"{value!r} is not a cached route of this app")
        return [route_tag(normalise_template(value))]
    return _bad(_PURGE_SHAPE)


def _find(cache: CacheSource, request: Request) -> CacheShell | Response:
    try:
        return resolve_cache(cache, request.scope)
    except LookupError as exc:
        return JSONResponse({"error": str(exc)}, status_code=500, headers=_SECURITY_HEADERS)


def _cross_site(request: Request) -> str | None:
    """Why a purge request may come from another site, or None."""
    if request.headers.get(PURGE_HEADER) != "1":
        return f"a purge needs the {PURGE_HEADER.title()}: 1 header (the dashboard's page sends it)"
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return "a purge is a JSON request"
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"a purge from another site ({site}) is refused"
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
        return "a purge from another origin is refused"
    return None


def _bad(message: str) -> Response:
    return JSONResponse({"error": message}, status_code=400, headers=_SECURITY_HEADERS)



def _forbidden(message: str) -> Response:
    return JSONResponse({"error": message}, status_code=403, headers=_SECURITY_HEADERS)
