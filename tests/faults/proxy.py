"""A TCP proxy between cachemw and Redis that a test can slow down, blackhole or reset.

It runs its own event loop in a thread, so a Redis that stops answering through
it never blocks the test's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

__all__ = ["FaultProxy"]


class FaultProxy:
    """``mode`` is "pass", "delay", "blackhole" (read, never answer) or "reset" (close at once)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.delay = 0.0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port: int = sock.getsockname()[1]
        self._sock = sock
        self._thread = threading.Thread(target=self._run, daemon=True)
        ready = threading.Event()
        self._ready = ready
        self._thread.start()
        ready.wait(5)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def set(self, mode: str, delay: float = 0.0) -> None:
        self.mode, self.delay = mode, delay
        if mode == "reset":
            self._loop.call_soon_threadsafe(self._reset_all)

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            self._reset_all()

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._client, sock=self._sock)
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def _reset_all(self) -> None:
        for writer in list(self._writers):
            transport = writer.transport
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            transport.abort()
        self._writers.clear()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, upstream_writer))

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, to_redis: bool) -> None:
            try:
                while data := await source.read(65536):
                    if self.mode == "blackhole":
                        continue  # swallow: the caller waits for an answer that never comes
                    if self.mode == "delay" and not to_redis:
                        await asyncio.sleep(self.delay)
                    sink.write(data)
                    await sink.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pump(reader, upstream_writer, True), pump(upstream_reader, writer, False))
        self._writers.discard(writer)
        self._writers.discard(upstream_writer)
