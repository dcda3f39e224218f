"""The lifespan through the middleware: as transparent as the app's own, exceptions and Ctrl-C included."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Message

import cachemw.asgi.middleware
import cachemw.runtime.runtime
from cachemw import CacheMiddleware, MemoryStore, RedisStore, Settings, cache
from tests.budgets import Budgets
from tests.redis_server import free_port
from tests.sample_server import REPO_ROOT, STOP_DEADLINE, Server, wait_until_ready


class StartupBroke(RuntimeError):
    pass


@asynccontextmanager
async def broken_lifespan(app: Any) -> AsyncIterator[None]:
    raise StartupBroke("the database is not there")
    yield  # pragma: no cover


def _wrapped(app: Starlette) -> Any:
    return CacheMiddleware(app, store=MemoryStore())


def _added(app: Starlette) -> Any:
    app.add_middleware(CacheMiddleware, store=MemoryStore())
    return app


@pytest.mark.parametrize("form", [_wrapped, _added], ids=["wrapped", "add_middleware"])
@pytest.mark.parametrize("cached", [False, True], ids=["no-policy", "policy"])
def test_the_apps_own_lifespan_exception_comes_out_as_it_was_raised(form: Any, cached: bool) -> None:
    async def page(request: Any) -> PlainTextResponse:
        return PlainTextResponse("page")

    endpoint = cache(ttl="1m")(page) if cached else page
    app = form(Starlette(routes=[Route("/page", endpoint)], lifespan=broken_lifespan))
    with pytest.raises(StartupBroke, match="the database is not there"), TestClient(app):
        pass  # pragma: no cover


def test_ctrl_c_on_the_sample_app_prints_no_lifespan_error(tmp_path: Path) -> None:
    port = free_port()
    server = Server(url=f"http://127.0.0.1:{port}", log_path=tmp_path / "server.log", redis_url=None)
    env = dict(os.environ, SAMPLE_DB_DELAY="0.01", SAMPLE_DB_PATH=str(tmp_path / "sample.sqlite3"))
    env.pop("CACHEMW_REDIS_URL", None)
    with server.log_path.open("wb") as log:
        # SIGINT as a terminal sends it, even when this test runs with SIGINT ignored (nohup, CI runners).
        proc = subprocess.Popen([sys.executable, "-m", "sample_app", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            wait_until_ready(proc, server)
            with server.client() as http:
                assert http.get("/products/1").status_code == 200
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=STOP_DEADLINE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = server.log()
    assert "Application shutdown complete" in output, output
    assert "lifespan' protocol appears unsupported" not in output, output
    assert "Traceback" not in output, output


def test_gc_freeze_runs_once_per_process_and_only_with_a_policy(tmp_path: Path) -> None:
    """Fifty startups of an app with a policy freeze once; an app without one never freezes."""
    script = tmp_path / "startups.py"
    script.write_text(textwrap.dedent("""
        import gc, sys
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route
        from starlette.testclient import TestClient
        from cachemw import CacheMiddleware, MemoryStore, cache

        def app(cached):
            async def page(request):
                return PlainTextResponse("page")
            endpoint = cache(ttl="1m")(page) if cached else page
            return CacheMiddleware(Starlette(routes=[Route("/page", endpoint)]), store=MemoryStore())

        cached = sys.argv[1] == "policy"
        counts = []
        for _ in range(50):
            with TestClient(app(cached)) as http:
                http.get("/page")
            counts.append(gc.get_freeze_count())
        print(counts[0], counts[-1])
    """))
    def run(mode: str) -> tuple[int, int]:
        done = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, cwd=REPO_ROOT,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        first, last = done.stdout.split()
        return int(first), int(last)

    first, last = run("policy")
    assert first > 0 and last == first  # later startups' objects stay collectable
    assert run("no-policy") == (0, 0)
    gc.collect()


@pytest.mark.anyio
async def test_shutdown_complete_reaches_the_server_only_after_our_cleanup(
        redis_url: str, budgets: Budgets, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that hears "complete" may end the loop at once (uvicorn on Ctrl-C): the store it
    would leave open must be closed by then."""
    closed: list[str] = []

    class Watched(RedisStore):
        async def aclose(self) -> None:
            await anyio.sleep(0.05)  # a store's close awaits its connections: the loop turns meanwhile
            await super().aclose()
            closed.append("store")

    monkeypatch.setattr(cachemw.runtime.runtime, "open_store",
                        lambda settings: Watched.from_url(redis_url, timeout=settings.store_timeout))
    middleware = CacheMiddleware(Starlette(routes=[Route("/page", cache(ttl="1m")(_page))]),
                                 settings=Settings(redis_url=redis_url, store_timeout=budgets.store_timeout))
    to_app, app_inbox = anyio.create_memory_object_stream[Message](4)
    server_outbox, to_server = anyio.create_memory_object_stream[Message](4)
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    with anyio.fail_after(budgets.condition):
        async with to_app, app_inbox, server_outbox, to_server, anyio.create_task_group() as tg:
            tg.start_soon(middleware, scope, app_inbox.receive, server_outbox.send)
            await to_app.send({"type": "lifespan.startup"})
            assert (await to_server.receive())["type"] == "lifespan.startup.complete"
            await to_app.send({"type": "lifespan.shutdown"})
            assert (await to_server.receive())["type"] == "lifespan.shutdown.complete"
            assert closed == ["store"]  # what a server that stops the loop now would have cut short


async def _page(request: Any) -> PlainTextResponse:
    return PlainTextResponse("page")
