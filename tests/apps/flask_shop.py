"""A Flask app behind the WSGI CacheMiddleware, for in-process tests and for real gunicorn workers.

Each view counts its runs in Redis (``calls:<view>``), so a test can tell how many
times a handler ran across every worker process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import anyio
import redis
from flask import Flask, jsonify, request
from flask.views import MethodView

from cachemw import Settings, cache
from cachemw.wsgi import CacheMiddleware, detach, invalidate

REDIS_URL = os.environ.get("CACHEMW_REDIS_URL", "redis://127.0.0.1:1")
SLOW_VIEW = 0.3  # seconds


def make_app(redis_url: str = REDIS_URL, counts_url: str | None = None, **settings: Any) -> Flask:
    """``counts_url``: where views count their runs (default: the cache's Redis; another one for tests that kill it)."""
    counts = redis.Redis.from_url(counts_url or os.environ.get("CACHEMW_COUNTS_URL") or redis_url)
    app = Flask(__name__)

    def ran(view: str) -> int:
        return int(counts.incr(f"calls:{view}"))

    _cached_views(app, ran, counts)
    _other_views(app, ran, counts)
    app.wsgi_app = CacheMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, redis_url=redis_url, settings=Settings(**{"store_timeout": 0.5, **settings}))
    return app


def _cached_views(app: Flask, ran: Callable[[str], int], counts: redis.Redis) -> None:
    @app.get("/ready")
    def ready() -> Any:
        return "ok"

    @app.get("/items/<int:item_id>")
    @cache(ttl="5m", tags=["item:{item_id}"])
    def item(item_id: int) -> Any:
        return jsonify(item=item_id, run=ran("item"), q=request.args.get("q"))

    @app.get("/me")
    @cache(ttl="5m", private=True)
    def me() -> Any:
        return jsonify(user=request.headers.get("Authorization", "nobody"), run=ran("me"))

    @app.get("/feed")
    @cache(ttl="5m")
    def feed() -> Any:
        return jsonify(run=ran("feed"), auth=request.headers.get("Authorization"))

    @app.get("/slow/<int:n>")
    @cache(ttl="5m")
    def slow(n: int) -> Any:
        run = ran("slow")
        time.sleep(SLOW_VIEW)  # a slow database read: concurrent requests arrive while it runs
        return jsonify(n=n, run=run, pid=os.getpid())

    @app.get("/gate/<int:n>")
    @cache(ttl="5m")
    def gate(n: int) -> Any:
        run = ran("gate")
        counts.blpop([f"gate:{n}"], timeout=60)  # held until the test opens it (LPUSH gate:<n>)
        return jsonify(n=n, run=run)

    @app.get("/stream")
    @cache(ttl="5m")
    def stream() -> Any:
        ran("stream")
        return app.response_class((f"part{n};" for n in range(5)), mimetype="text/plain")

    @app.get("/login")
    @cache(ttl="5m")
    def login() -> Any:
        response = jsonify(run=ran("login"))
        response.set_cookie("session", "s3cret")
        return response

    @app.get("/boom")
    @cache(ttl="5m")
    def boom() -> Any:
        ran("boom")
        raise RuntimeError("the view failed")

    class Report(MethodView):
        def get(self) -> Any:
            return jsonify(run=ran("report"))

    app.add_url_rule("/report", view_func=cache(ttl="5m")(Report).as_view("report"))


def _other_views(app: Flask, ran: Callable[[str], int], counts: redis.Redis) -> None:
    @app.post("/items/<int:item_id>")
    def change(item_id: int) -> Any:
        return jsonify(dropped=invalidate(tags=[f"item:{item_id}"]))

    @app.post("/later")
    def later() -> Any:
        async def record() -> None:
            await anyio.sleep(float(request_delay))  # work that outlasts the response: shutdown waits for it
            counts.incr("calls:detached")

        request_delay = request.args.get("delay", "0")
        return jsonify(taken=detach(record))

    @app.get("/plain")
    def plain() -> Any:
        return jsonify(run=ran("plain"))



app = make_app() if os.environ.get("CACHEMW_REDIS_URL") else None
