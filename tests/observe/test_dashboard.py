"""The dashboard: its JSON and purges over ASGI, then the page itself in headless Chromium against uvicorn.

The browser tests need Debian's ``chromium`` (``apt-get install chromium``) or
``CACHEMW_CHROMIUM=/path/to/chrome``; without one they fail with that hint, they
never skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from cachemw import CacheMiddleware, MemoryStore, cache
from cachemw.observe import enable_history, history
from cachemw.observe.dashboard import dashboard_app, loopback_only
from tests.helpers import eventually, lifespan

CHROMIUM_ENV = "CACHEMW_CHROMIUM"
SCREENSHOT_ENV = "CACHEMW_DASHBOARD_SCREENSHOT"  # where to keep the rendering test's screenshot, if set
CHROMIUM_HINT = (f"no Chromium found (looked at ${CHROMIUM_ENV}, chromium, chromium-browser, google-chrome on PATH). "
                 "HINT: apt-get install -y chromium (Debian's package), or set "
                 f"{CHROMIUM_ENV}=/path/to/chrome")
OUTSIDER = ("203.0.113.9", 40000)  # TEST-NET-3: never a loopback address
PURGE_HEADERS = {"content-type": "application/json", "x-cachemw-purge": "1"}  # as the page's script sends them


@cache(ttl="5m", tags=["product:{id}"])
async def product(request: Request) -> Response:
    return JSONResponse({"id": request.path_params["id"], "at": time.time()})


@cache("hours")
async def stats(request: Request) -> Response:
    return JSONResponse({"visitors": 42})


@cache("realtime")
async def cart(request: Request) -> Response:
    return JSONResponse({"items": []})


def make_app(*, redis_url: str | None = None, **dashboard: Any) -> CacheMiddleware:
    inner = Starlette(routes=[
        Route("/products/{id:int}", product),
        Route("/stats", stats),
        Route("/cart", cart),
        Mount("/_cachemw", app=dashboard_app(**dashboard)),
    ])
    cached = CacheMiddleware(inner, redis_url=redis_url, key_prefix="dash",
                             store=None if redis_url else MemoryStore())
    cached.prepare(inner)
    return cached


def asgi_client(app: Any, client: tuple[str, int] = ("127.0.0.1", 50000)) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=client), base_url="http://127.0.0.1")


@pytest.fixture
async def app() -> AsyncIterator[CacheMiddleware]:
    cached = make_app()
    async with lifespan(cached):
        yield cached


async def fill(app: CacheMiddleware, *paths: str) -> None:
    async with asgi_client(app) as http:
        for path in paths:
            assert (await http.get(path)).headers["x-cache"] == "MISS"

        async def stored() -> bool:
            return app.supervisor.counters_for("fill").done >= len(paths)

        await eventually(stored, what="the fills")
        for path in paths:
            assert (await http.get(path)).headers["x-cache"] == "HIT"


async def state_of(app: CacheMiddleware, path: str) -> str:
    async with asgi_client(app) as http:
        state: str = (await http.get(path)).headers["x-cache"]
    return state


# -- over ASGI ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_page_and_its_script_are_served_with_a_strict_policy(app: CacheMiddleware) -> None:
    async with asgi_client(app) as http:
        redirect = await http.get("/_cachemw")
        assert redirect.status_code in (307, 308)
        page = await http.get("/_cachemw/")
        script = await http.get("/_cachemw/dashboard.js")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script src="dashboard.js"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere
    assert "X-Cachemw-Purge" in script.text
    assert script.headers["content-type"].startswith("text/javascript")
    for response in (page, script):
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert "x-cache" not in response.headers  # never cached: no policy on the dashboard's routes


@pytest.mark.anyio
async def test_the_state_has_the_snapshot_and_the_history(app: CacheMiddleware) -> None:
    await fill(app, "/products/1", "/stats")
    async with asgi_client(app) as http:
        response = await http.get("/_cachemw/api/state")
    assert response.status_code == 200
    data = response.json()
    assert data["can_purge"] is True
    rows = {row["route"]: row for row in data["snapshot"]["routes"]}
    assert rows["/products/{id:int}"]["hit"] == 1
    assert rows["/products/{id:int}"]["hit_ratio"] == 0.5
    assert rows["/stats"]["policy"] == "hours"
    assert rows["/cart"]["cached"] is False
    assert data["snapshot"]["store"]["kind"] == "memory"
    assert "fill" in data["snapshot"]["supervisor"]["kinds"]
    assert data["history"]  # sampled by the middleware's history service (and by polling)

    async def sampled() -> bool:
        async with asgi_client(app) as http:
            history = (await http.get("/_cachemw/api/state")).json()["history"]
        return bool(history) and history[-1]["hit"] == 2

    await eventually(sampled, what="a history sample with both hits")


@pytest.mark.anyio
async def test_purge_by_route_and_by_tag(app: CacheMiddleware) -> None:
    await fill(app, "/products/1", "/products/2", "/stats")
    async with asgi_client(app) as http:
        response = await http.post("/_cachemw/api/purge", content=json.dumps({"tag": "product:1"}),
                                   headers=PURGE_HEADERS)
        assert response.status_code == 200, response.text
        assert response.json() == {"dropped": 1, "tag": "product:1"}
        assert (await http.get("/products/1")).headers["x-cache"] == "MISS"
        assert (await http.get("/products/2")).headers["x-cache"] == "HIT"

        response = await http.post("/_cachemw/api/purge", content=json.dumps({"route": "/stats"}),
                                   headers={**PURGE_HEADERS, "origin": "http://127.0.0.1",
                                            "sec-fetch-site": "same-origin"})
        assert response.status_code == 200, response.text
        assert response.json()["dropped"] == 1
        assert (await http.get("/stats")).headers["x-cache"] == "MISS"


@pytest.mark.anyio
async def test_a_client_that_is_not_allowed_can_neither_look_nor_purge(app: CacheMiddleware) -> None:
    await fill(app, "/products/1")
    async with asgi_client(app, client=OUTSIDER) as http:
        for path in ("/_cachemw/", "/_cachemw/dashboard.js", "/_cachemw/api/state"):
            assert (await http.get(path)).status_code == 403, path
        response = await http.post("/_cachemw/api/purge", content=json.dumps({"route": "/products/{id}"}),
                                   headers=PURGE_HEADERS)
        assert response.status_code == 403
        assert "/products/" not in response.text
    assert await state_of(app, "/products/1") == "HIT"  # nothing purged
    # A local client relayed by a proxy on this host is someone else.
    async with asgi_client(app) as http:
        response = await http.post("/_cachemw/api/purge", content=json.dumps({"route": "/products/{id}"}),
                                   headers={**PURGE_HEADERS, "x-forwarded-for": OUTSIDER[0]})
        assert response.status_code == 403
    assert await state_of(app, "/products/1") == "HIT"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"content-type": "application/json"}, {"route": "/products/{id}"}, 403),  # no X-Cachemw-Purge
        ({"x-cachemw-purge": "1", "content-type": "application/x-www-form-urlencoded"}, {"route": "/products/{id}"},
         403),
        ({**PURGE_HEADERS, "origin": "https://evil.example"}, {"route": "/products/{id}"}, 403),
        ({**PURGE_HEADERS, "sec-fetch-site": "cross-site"}, {"route": "/products/{id}"}, 403),
        (PURGE_HEADERS, {"route": "/nowhere"}, 400),
        (PURGE_HEADERS, {"route": "/cart/{x}"}, 400),
        (PURGE_HEADERS, {"tag": ""}, 400),
        (PURGE_HEADERS, {"tag": "a", "route": "/stats"}, 400),
        (PURGE_HEADERS, ["product:1"], 400),
    ],
    ids=["no-header", "form", "origin", "cross-site", "unknown-route", "uncached-route", "empty-tag", "two",
         "not-an-object"],
)
async def test_purges_that_are_refused(app: CacheMiddleware, headers: dict[str, str], body: Any, status: int) -> None:
    await fill(app, "/products/1")
    async with asgi_client(app) as http:
        response = await http.post("/_cachemw/api/purge", content=json.dumps(body), headers=headers)
        assert (await http.get("/_cachemw/api/purge")).status_code == 405
    assert response.status_code == status, response.text
    assert "error" in response.json()
    assert await state_of(app, "/products/1") == "HIT"


@pytest.mark.anyio
async def test_custom_checks_for_looking_and_purging() -> None:
    async def admin(request: Request) -> bool:
        return request.headers.get("x-admin") == "yes"

    cached = make_app(allow=lambda request: True, allow_purge=admin)
    async with lifespan(cached):
        await fill(cached, "/products/1")
        async with asgi_client(cached, client=OUTSIDER) as http:
            state = await http.get("/_cachemw/api/state")
            assert state.status_code == 200
            assert state.json()["can_purge"] is False
            body = json.dumps({"tag": "product:1"})
            assert (await http.post("/_cachemw/api/purge", content=body, headers=PURGE_HEADERS)).status_code == 403
            assert await state_of(cached, "/products/1") == "HIT"
            purged = await http.post("/_cachemw/api/purge", content=body, headers={**PURGE_HEADERS, "x-admin": "yes"})
            assert purged.status_code == 200
            assert (await http.get("/_cachemw/api/state", headers={"x-admin": "yes"})).json()["can_purge"] is True
        assert await state_of(cached, "/products/1") == "MISS"


@pytest.mark.anyio
async def test_a_dashboard_outside_a_cached_app_says_so() -> None:
    lonely = Starlette(routes=[Mount("/_cachemw", app=dashboard_app())])
    async with asgi_client(lonely) as http:
        response = await http.get("/_cachemw/api/state")
        assert response.status_code == 500
        assert "no CacheMiddleware" in response.json()["error"]
        purge = await http.post("/_cachemw/api/purge", content=json.dumps({"tag": "x"}), headers=PURGE_HEADERS)
        assert purge.status_code == 500


@pytest.mark.parametrize(
    ("host", "headers", "allowed"),
    [("127.0.0.1", {}, True), ("127.8.9.10", {}, True), ("::1", {}, True), ("::ffff:127.0.0.1", {}, True),
     ("10.0.0.1", {}, False), ("::ffff:10.0.0.1", {}, False), ("2001:db8::1", {}, False), ("testclient", {}, False),
     (None, {}, False), ("127.0.0.1", {"forwarded": "for=203.0.113.9"}, False),
     ("127.0.0.1", {"x-real-ip": "203.0.113.9"}, False),
     ("127.0.0.1", {"host": "localhost:8000"}, True), ("127.0.0.1", {"host": "127.0.0.1:8000"}, True),
     ("127.0.0.1", {"host": "[::1]:8000"}, True),
     ("127.0.0.1", {"host": "evil.example"}, False), ("127.0.0.1", {"host": "evil.example:8000"}, False)],
)
def test_loopback_only(host: str | None, headers: dict[str, str], allowed: bool) -> None:
    scope = {"type": "http", "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
             "client": None if host is None else (host, 1234)}
    assert loopback_only(Request(scope)) is allowed


@pytest.mark.anyio
async def test_a_rule_over_every_route_never_caches_the_dashboard(tmp_path: Path) -> None:
    """Its state is answered per request, for allowed clients only: a cached copy would skip ``allow``."""
    config = tmp_path / "cachemw.toml"
    config.write_text('[cachemw]\n[[cachemw.rules]]\nroute = "/*"\nttl = "5m"\n')
    inner = Starlette(routes=[Route("/stats", stats), Mount("/_cachemw", app=dashboard_app())])
    app = CacheMiddleware(inner, config=config, store=MemoryStore())
    async with asgi_client(app) as http:
        for _ in range(2):
            state = await http.get("/_cachemw/api/state")
            assert state.status_code == 200 and state.headers["x-cache"] == "MISS"  # the rule covers it
    async with asgi_client(app, client=OUTSIDER) as outsider:
        response = await outsider.get("/_cachemw/api/state")
    assert response.status_code == 403 and response.headers.get("x-cache") != "HIT"


@pytest.mark.anyio
async def test_dns_rebinding_neither_reads_nor_purges(app: CacheMiddleware) -> None:
    """A page of another site whose name now resolves to 127.0.0.1: loopback client, foreign Host."""
    await fill(app, "/products/1")
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://evil.example:8000") as rebound:
        state = await rebound.get("/_cachemw/api/state")
        purge = await rebound.post("/_cachemw/api/purge", content=json.dumps({"tag": "product:1"}),
                                   headers={**PURGE_HEADERS, "origin": "http://evil.example:8000",
                                            "sec-fetch-site": "same-origin"})
    assert state.status_code == 403 and purge.status_code == 403
    async with asgi_client(app) as http:
        assert (await http.get("/products/1")).headers["x-cache"] == "HIT"


# -- in a real browser ----------------------------------------------------------------------------


def find_chromium() -> str:
    configured = os.environ.get(CHROMIUM_ENV)
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            pytest.fail(f"{CHROMIUM_ENV}={configured!r} is not an executable file", pytrace=False)
        return configured
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(CHROMIUM_HINT, pytrace=False)


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900")


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn (with its lifespan) in a thread, on a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def live(redis_url: str) -> Iterator[tuple[str, CacheMiddleware]]:
    """The app with the dashboard on Redis, served by uvicorn, with traffic spread over a few history samples."""
    cached = make_app(redis_url=redis_url)
    enable_history(cached, interval=0.2)
    with serve(cached) as base, httpx.Client(base_url=base) as http:
        for round_ in range(6):
            for path in ("/products/1", "/products/2", "/stats", "/cart"):
                http.get(path)
            if round_ == 0:
                deadline = time.monotonic() + 5
                while cached.supervisor.counters_for("fill").done < 3 and time.monotonic() < deadline:
                    time.sleep(0.01)
            time.sleep(0.2)
        assert http.get("/products/1").headers["x-cache"] == "HIT"
        assert len(history(cached)) >= 4
        yield base, cached


class _DOM(HTMLParser):
    """The elements of a dumped DOM: tag, attributes and text, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[dict[str, Any]] = []
        self._open: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(element)
        if tag not in ("input", "br", "meta", "link", "img", "line", "polyline"):
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element["text"] += data

    def find(self, tag: str | None = None, **attrs: str) -> list[dict[str, Any]]:
        return [e for e in self.elements if (tag is None or e["tag"] == tag)
                and all(e["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items())]


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and rows of RGB(A) bytes of an 8-bit, non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, idat = 8, b""
    width = height = channels = 0
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        chunk = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        position += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind_ = raw[start]
        row = bytearray(raw[start + 1 : start + 1 + stride])
        if kind_ == 1:
            for i in range(channels, stride):
                row[i] = (row[i] + row[i - channels]) & 0xFF
        elif kind_ == 2:
            row = bytearray((a + b) & 0xFF for a, b in zip(row, previous, strict=True))
        elif kind_ == 3:
            for i in range(stride):
                left = row[i - channels] if i >= channels else 0
                row[i] = (row[i] + ((left + previous[i]) >> 1)) & 0xFF
        elif kind_ == 4:
            for i in range(stride):
                a = row[i - channels] if i >= channels else 0
                b = previous[i]
                c = previous[i - channels] if i >= channels else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(row))
        previous = row
    return width, height, [row if channels == 3 else bytes(v for i, v in enumerate(row) if i % 4 != 3)
                           for row in rows]


def colour_count(rows: list[bytes], rgb: tuple[int, int, int]) -> int:
    pixel = bytes(rgb)
    return sum(len(re.findall(re.escape(pixel), row)) for row in rows)


def test_the_dashboard_renders_in_chromium(live: tuple[str, CacheMiddleware], tmp_path: Path) -> None:
    base, _ = live
    chromium = find_chromium()
    screenshot = tmp_path / "dashboard.png"
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}",
         "--virtual-time-budget=5000", "--dump-dom", base + "/_cachemw/"],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = _DOM()
    dom.feed(result.stdout)

    assert dom.find("body", data_loaded="true"), "the script never rendered the state"
    assert not any(e["text"].strip() for e in dom.find(id="error")), "the page shows an error"
    rows = {e["attrs"]["data-route"]: e for e in dom.find("tr") if "data-route" in e["attrs"]}
    assert set(rows) == {"/products/{id:int}", "/stats", "/cart"}  # the cached and realtime routes
    assert "custom" in rows["/products/{id:int}"]["text"]
    assert "hours" in rows["/stats"]["text"]
    assert "realtime" in rows["/cart"]["text"]
    busy = [e["text"] for e in dom.find("td", **{"class": "origin-busy"})]
    assert len(busy) == 3 and all(text.isdigit() for text in busy), busy  # past origin_concurrency, per route
    ratios = [e["text"] for e in dom.find("td", **{"class": "hit-ratio"})]
    assert len(ratios) == 3
    assert any(re.match(r"\d+\.\d%", text) and text != "0.0%" for text in ratios), ratios
    purge_buttons = dom.find("button", **{"class": "purge"})
    assert {b["attrs"].get("data-route") for b in purge_buttons} == {"/products/{id:int}", "/stats", None}
    assert all("disabled" not in b["attrs"] for b in purge_buttons)
    assert dom.find("input", id="purge-tag")

    [chart] = dom.find("svg", id="chart")
    assert int(chart["attrs"]["data-samples"]) >= 4
    assert {e["attrs"]["data-series"] for e in dom.find("polyline")} == {"hit", "stale", "miss", "bypass"}

    assert dom.find("tr", data_kind="fill"), "the background queue shows no fills"
    assert "queued of" in dom.find(id="queue-summary")[0]["text"]
    [store] = dom.find("section", id="store")
    assert store["attrs"]["data-health"] == "ok"
    assert "healthy" in store["text"]
    assert "redis at 127.0.0.1:" in store["text"]
    assert "closed" in store["text"]
    assert "no write-behind queue registered" in result.stdout

    data = screenshot.read_bytes()
    width, height, pixels = png_pixels(data)
    assert (width, height) == (1280, 900)
    assert len(data) > 20_000, "a blank page compresses to almost nothing"
    assert colour_count(pixels[:40], (0x1D, 0x23, 0x30)) > 10_000, "no header bar"
    assert colour_count(pixels, (0x1A, 0x7F, 0x37)) > 50, "no HIT line or ratio bar in green"
    assert colour_count(pixels, (0xCF, 0x22, 0x2E)) > 20, "no MISS line in red"
    assert colour_count(pixels, (0xDA, 0xFB, 0xE1)) > 50, "no green 'healthy' pill"
    # The documentation's picture of the dashboard is this screenshot, once it passed the checks above:
    # CACHEMW_DASHBOARD_SCREENSHOT=docs/img/dashboard.png .venv/bin/pytest tests/observe/test_dashboard.py
    keep = os.environ.get(SCREENSHOT_ENV)
    if keep:
        shutil.copyfile(screenshot, keep)


class Browser:
    """Just enough of the DevTools protocol, over --remote-debugging-pipe (no WebSocket needed)."""

    def __init__(self, chromium: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # The browser reads commands on fd 3 and writes replies on fd 4: a trampoline puts the pipes there.
        trampoline = ("import fcntl, os, sys; "
                      "r, w = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3]); "
                      "os.dup2(r, 3); os.dup2(w, 4); os.set_inheritable(3, True); os.set_inheritable(4, True); "
                      "os.execv(sys.argv[3], sys.argv[3:])")
        self.process = subprocess.Popen(
            [sys.executable, "-c", trampoline, str(to_chrome_r), str(from_chrome_w), chromium, *CHROMIUM_FLAGS,
             f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next = 0
        targets = self.call("Target.getTargets")["targetInfos"]
        [page] = [t for t in targets if t["type"] == "page"][:1]
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, **params: Any) -> Any:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 30
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next:
                    assert "error" not in reply, reply["error"]
                    return reply["result"]
            assert time.monotonic() < deadline, f"no reply to {method}"
            chunk = os.read(self._from_chrome, 1 << 16)
            assert chunk, "the browser went away"
            self._buffer += chunk

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True,
                           awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"never true in the page: {expression}"
            time.sleep(0.05)

    def close(self) -> None:
        with contextlib.suppress(OSError, AssertionError):
            self.call("Browser.close")
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def test_the_purge_buttons_work_in_chromium(live: tuple[str, CacheMiddleware], tmp_path: Path) -> None:
    base, _ = live
    browser = Browser(find_chromium(), tmp_path / "profile")
    try:
        browser.call("Page.navigate", browser.session, url=base + "/_cachemw/")
        browser.wait_for("document.body !== null && document.body.dataset.loaded === 'true'")
        browser.evaluate("window.confirm = () => true")  # the page asks before it purges
        button = "document.querySelector('button.purge[data-route=\"/products/{id:int}\"]')"
        assert browser.evaluate(f"{button} !== null && !{button}.disabled")
        browser.evaluate(f"{button}.click()")
        result = browser.wait_for("document.getElementById('purge-result').dataset.dropped")
        assert result == "2", browser.evaluate("document.getElementById('purge-result').textContent")
        assert "purged /products/{id:int}: 2 entries dropped" in browser.evaluate(
            "document.getElementById('purge-result').textContent")
        with httpx.Client(base_url=base) as http:
            assert http.get("/products/1").headers["x-cache"] == "MISS"
            assert http.get("/products/2").headers["x-cache"] == "MISS"
            assert http.get("/stats").headers["x-cache"] == "HIT"  # another route: untouched

        browser.evaluate("document.getElementById('purge-result').removeAttribute('data-dropped')")
        browser.evaluate("document.getElementById('purge-tag').value = 'route:/stats'")
        browser.evaluate("document.getElementById('purge-tag-button').click()")
        assert browser.wait_for("document.getElementById('purge-result').dataset.dropped") == "1"
        with httpx.Client(base_url=base) as http:
            assert http.get("/stats").headers["x-cache"] == "MISS"
    finally:
        browser.close()


def test_the_dashboard_is_an_attribute_of_a_plain_import_cachemw() -> None:
    import subprocess
    import sys

    # A fresh interpreter: in this one some test has imported cachemw.dashboard already.
    code = ("import sys, cachemw\nassert 'cachemw.dashboard' not in sys.modules\n"
            "from starlette.routing import Mount\nMount('/_cachemw', app=cachemw.dashboard.dashboard_app())\n"
            "assert cachemw.observe.metrics_app\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
