"""The ceiling: a raw ASGI callable answering a constant ~1 KB JSON body (no framework, no routing).

Serve: ``uvicorn peer_raw:app --app-dir bench/apps``. ``/_calls`` answers the GC totals
like every app of ``bench/peers.py``; any other path gets the constant body.
"""

from __future__ import annotations

from typing import Any

import peer_common

BODY = peer_common.payload_bytes(0)
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
START = {"type": "http.response.start", "status": 200, "headers": HEADERS}
BODY_MESSAGE = {"type": "http.response.body", "body": BODY}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        if scope["path"] == "/_calls":
            body = peer_common.calls_json()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await send(START)
        await send(BODY_MESSAGE)
    elif scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
