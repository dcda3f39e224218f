"""Serving the Flask shop: gunicorn's gthread workers when gunicorn is installed, else Werkzeug's threaded server.

The database is seeded once, here, before any worker starts: every worker then
reads the same prices, so a price change made through one is what the others read
(each worker seeding its own file would let them disagree). Each worker builds its
own app, and the middleware its own cache loop, after the fork.
"""

from __future__ import annotations

import functools
import importlib.util
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from sample_app.db import create_and_seed
from sample_app.flask_app import create_app, temporary_database
from sample_app.shop import env_db_path

__all__ = ["default_server", "serve"]

WSGIApp = Callable[..., Any]


def default_server() -> str:
    """gunicorn if it is installed (the test extra has it), else Werkzeug's server, which comes with Flask."""
    return "gunicorn" if importlib.util.find_spec("gunicorn") is not None else "werkzeug"


def serve(*, host: str, port: int, server: str, workers: int, threads: int) -> None:
    """Seed the database in this process, then serve until SIGTERM or Ctrl-C."""
    setting = env_db_path()
    path = temporary_database() if setting is None else Path(setting)
    create_and_seed(path)  # the sample tables recreated on every start, so demos repeat
    factory = functools.partial(create_app, db_path=path, seed=False)
    if server == "gunicorn":
        _gunicorn(factory, host, port, workers, threads)
    else:
        _werkzeug(factory(), host, port)


def _gunicorn(factory: Callable[[], WSGIApp], host: str, port: int, workers: int, threads: int) -> None:
    from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]

    class Shop(BaseApplication):  # type: ignore[misc]
        """gunicorn run from Python: these options, and the app built in each worker (not preloaded)."""

        def load_config(self) -> None:
            bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            options: dict[str, object] = {"bind": bind, "workers": workers, "worker_class": "gthread",
                                          "threads": threads, "loglevel": "info"}
            if "control_socket_disable" in self.cfg.settings:  # newer gunicorn: no socket in the home directory
                options["control_socket_disable"] = True
            for name, value in options.items():
                self.cfg.set(name, value)

        def load(self) -> WSGIApp:
            return factory()

    Shop().run()


def _werkzeug(app: WSGIApp, host: str, port: int) -> None:
    from werkzeug.serving import make_server

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)  # out of serve_forever; at exit the cache drains its background work

    signal.signal(signal.SIGTERM, stop)
    server = make_server(host, port, app, threaded=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
