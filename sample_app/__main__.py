"""``python -m sample_app [--flask] [--host 127.0.0.1] [--port 8000]``: serve the sample shop.

The Starlette shop with uvicorn; with ``--flask`` the Flask shop, with gunicorn
(gthread workers) when it is installed, else Werkzeug's threaded server.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cachemw.core.settings import load_settings, masked_url
from sample_app.shop import CONFIG_PATH


def describe_store(redis_url: str | None) -> str:
    """The store in words, with any password in the Redis URL masked: this line goes to logs."""
    if not redis_url:
        return "in-process memory (set CACHEMW_REDIS_URL=redis://... to use Redis)"
    return f"Redis at {masked_url(redis_url)}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sample_app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    flask = parser.add_argument_group("the Flask shop")
    flask.add_argument("--flask", action="store_true", help="serve the Flask shop (sample_app/flask_app.py)")
    flask.add_argument("--server", choices=("gunicorn", "werkzeug"),
                       help="the WSGI server (default: gunicorn if installed, else werkzeug)")
    flask.add_argument("--workers", type=int, help="gunicorn worker processes (default: 2 on Redis, 1 on the "
                       "memory store)")
    flask.add_argument("--threads", type=int, default=4, help="threads per gunicorn worker (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    # The middleware resolves the store the same way (config file, then CACHEMW_REDIS_URL).
    redis_url = load_settings(CONFIG_PATH).redis_url
    store = describe_store(redis_url)
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host}:{args.port}"
    if args.flask:
        _serve_flask(parser, args, redis_url, f"store {store}; try `curl -i {base}/products/1` twice "
                     f"(X-Cache: MISS, then HIT), then POST a price to {base}/products/1/price (the next GET is "
                     "a MISS with the new price)")
        return
    if args.server is not None or args.workers is not None:
        parser.error("--server and --workers are for the Flask shop (--flask)")
    import uvicorn

    from sample_app.app import app

    print(
        f"cachemw sample app: store {store}; "
        f"try `curl -i {base}/products/1` twice (X-Cache: MISS, then HIT); "
        f"dashboard {base}/_cachemw/, metrics {base}/metrics",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port)


def _serve_flask(parser: argparse.ArgumentParser, args: argparse.Namespace, redis_url: str | None,
                 what: str) -> None:
    from sample_app.serve_flask import default_server, serve

    server = args.server or default_server()
    workers = args.workers if args.workers is not None else 2 if redis_url and server == "gunicorn" else 1
    if workers < 1 or args.threads < 1:
        parser.error("--workers and --threads take a number from 1")
    if workers > 1 and server != "gunicorn":
        parser.error("Werkzeug's server runs one process: --workers needs gunicorn (pip install gunicorn)")
    if workers > 1 and not redis_url:
        # Each process would keep its own entries, and a purge would reach only the one that made it.
        parser.error(f"the in-process memory store is per process: with --workers {workers} a price change would "
                     "purge one worker's copy only. Set CACHEMW_REDIS_URL=redis://... or use --workers 1")
    served = (f"gunicorn, {workers} gthread worker{'s' * (workers > 1)} of {args.threads} threads"
              if server == "gunicorn" else "Werkzeug's threaded server; pip install gunicorn for gunicorn")
    print(f"cachemw sample app (Flask, {served}): {what}", flush=True)
    serve(host=args.host, port=args.port, server=server, workers=workers, threads=args.threads)


if __name__ == "__main__":
    main()
