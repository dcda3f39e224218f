"""A lifespan for apps that have none of their own (a WSGI app, Django's ASGI handler, which refuses it)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["AnswersLifespan", "answer_lifespan"]


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Startup and shutdown complete at once: the cache in front runs its own around them."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class AnswersLifespan:
    """``app`` with the lifespan answered for it, so the cache's supervisor runs for the server's lifetime."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
        else:
            await self.app(scope, receive, send)
