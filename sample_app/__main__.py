"""``python -m sample_app [--host 127.0.0.1] [--port 8000]``: serve the sample app with uvicorn."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import uvicorn

from cachemw.core.settings import load_settings, masked_url
from sample_app.app import CONFIG_PATH, app


def describe_store(redis_url: str | None) -> str:
    """The store in words, with any password in the Redis URL masked: this line goes to logs."""
    if not redis_url:
        return "in-process memory (set CACHEMW_REDIS_URL=redis://... to use Redis)"
    return f"Redis at {masked_url(redis_url)}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sample_app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    args = parser.parse_args(argv)

    # The middleware resolves the store the same way (config file, then CACHEMW_REDIS_URL).
    store = describe_store(load_settings(CONFIG_PATH).redis_url)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"cachemw sample app: store {store}; "
        f"try `curl -i http://{host}:{args.port}/products/1` twice (X-Cache: MISS, then HIT); "
        f"dashboard http://{host}:{args.port}/_cachemw/, metrics http://{host}:{args.port}/metrics",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
