"""The request path's auto-pipelining Redis connection, against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import threading
import time
from collections.abc import Iterator

import anyio
import anyio.lowlevel
import pytest

from cachemw.store import RedisStore, StoreError
from cachemw.store.base import StoreTimeout
from cachemw.store.pipeline import PipelinedRedis, encode_command
from tests.budgets import Budgets
from tests.helpers import eventually
from tests.redis_server import RedisServer

pytestmark = pytest.mark.anyio


def _connection(server: RedisServer, **options: object) -> PipelinedRedis:
    return PipelinedRedis(host="127.0.0.1", port=server.port, **options)  # type: ignore[arg-type]


def test_encode_command_is_resp() -> None:
    assert encode_command(["SET", b"k\r\n", 12, 0.5]) == b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n$3\r\n0.5\r\n"


async def test_concurrent_commands_each_get_their_own_reply(redis_url: str, redis_server: RedisServer,
                                                             budgets: Budgets) -> None:
    with redis_server.client() as setup:
        setup.mset({f"k{i}": f"v{i}" for i in range(500)})
    client = _connection(redis_server, timeout=budgets.store_timeout)
    try:
        replies: dict[int, bytes | None] = {}

        async def get(i: int) -> None:
            replies[i] = await client.get(f"k{i}")

        async with anyio.create_task_group() as tg:
            for i in range(600):  # 100 of them absent
                tg.start_soon(get, i)
        assert replies == {i: (f"v{i}".encode() if i < 500 else None) for i in range(600)}
    finally:
        await client.aclose()


async def test_concurrent_first_commands_open_one_connection(redis_url: str, redis_server: RedisServer,
                                                             budgets: Budgets) -> None:
    def connections() -> int:
        with redis_server.client() as admin:
            return len(admin.client_list())

    before = connections()
    client = _connection(redis_server, timeout=budgets.store_timeout)
    try:
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(client.get, f"k{i}")
        assert connections() == before + 1
    finally:
        await client.aclose()


async def test_closing_while_the_first_command_connects_leaves_no_connection(
        redis_url: str, redis_server: RedisServer) -> None:
    def connections() -> int:
        with redis_server.client() as admin:
            return len(admin.client_list())

    before = connections()
    client = _connection(redis_server, timeout=1.0)
    outcome: list[object] = []

    async def first() -> None:
        try:
            outcome.append(await client.get("k"))
        except StoreError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await anyio.lowlevel.checkpoint()  # the get is connecting now
        await client.aclose()
    assert len(outcome) == 1 and isinstance(outcome[0], StoreError)
    assert connections() == before
    with pytest.raises(StoreError):
        await client.get("k")  # closed for good: no silent reconnect
    assert connections() == before


async def test_a_frozen_server_times_out_in_budget_then_closes_and_reconnects(
        redis_url: str, redis_server: RedisServer, budgets: Budgets) -> None:
    with redis_server.client() as setup:
        setup.set("k1", "a")
        setup.set("k2", "b")
    client = _connection(redis_server, timeout=0.05, stuck_after=0.3)
    try:
        assert await client.get("k1") == b"a"
        redis_server.pause()
        try:
            started = anyio.current_time()
            with pytest.raises(StoreTimeout):
                await client.get("k1")
            assert anyio.current_time() - started < 0.5  # the budget, not a hang
            # Later commands keep their own budget while the first one is overdue.
            with pytest.raises(StoreTimeout):
                await client.get("k2")
            first = client._connection
            assert first is not None
            with anyio.fail_after(2):  # the stuck connection is given up after stuck_after
                while not first.closed:  # noqa: ASYNC110  (polls the connection's state: it offers no event)
                    await anyio.sleep(0.01)
        finally:
            redis_server.resume()
        client.timeout = budgets.store_timeout  # what follows must be answered, also on a busy machine
        # A new connection: the frozen one's late replies can't answer these.
        assert await client.get("k2") == b"b"
        assert await client.get("k1") == b"a"
    finally:
        await client.aclose()


async def test_late_replies_are_dropped_in_order(redis_url: str, redis_server: RedisServer, budgets: Budgets
                                                 ) -> None:
    with redis_server.client() as setup:
        setup.set("slow", "late")
        setup.set("next", "right")
    client = _connection(redis_server, timeout=0.05, stuck_after=5)
    try:
        async def debug_sleep() -> None:
            await client.execute(encode_command(["DEBUG", "SLEEP", "0.2"]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(_swallow, debug_sleep())
            await anyio.sleep(0.01)
            with pytest.raises(StoreTimeout):
                await client.get("slow")  # queued behind the sleep: overdue
        with redis_server.client() as other:
            await anyio.to_thread.run_sync(other.ping)  # answered once the sleep is over
        client.timeout = budgets.store_timeout  # this one must be answered, also on a busy machine
        assert await client.get("next") == b"right"  # same connection, after the late reply to "slow"
    finally:
        await client.aclose()


async def _swallow(call: object) -> None:
    with contextlib.suppress(StoreError):
        await call  # type: ignore[misc]


async def test_a_cancelled_caller_does_not_shift_replies(redis_url: str, redis_server: RedisServer,
                                                         budgets: Budgets) -> None:
    with redis_server.client() as setup:
        setup.set("a", "1")
        setup.set("b", "2")
    client = _connection(redis_server, timeout=budgets.store_timeout)
    try:
        with anyio.move_on_after(0):  # cancelled before its reply arrives
            await client.get("a")
        assert await client.get("b") == b"2"
        assert await client.get("a") == b"1"
    finally:
        await client.aclose()


async def test_a_killed_server_fails_in_flight_commands_and_a_restart_reconnects(
        redis_url: str, redis_server: RedisServer) -> None:
    client = _connection(redis_server, timeout=0.2)
    try:
        assert await client.get("k") is None
        redis_server.stop()
        with pytest.raises(StoreError):
            await client.get("k")
        with pytest.raises(StoreError):
            await client.get("k")  # refused: still a StoreError, fast
        redis_server.start()
        with redis_server.client() as setup:
            setup.set("k", "back")
        assert await client.get("k") == b"back"
    finally:
        await client.aclose()


async def test_auth_and_db_from_the_url(redis_url: str, redis_server: RedisServer) -> None:
    with redis_server.client() as setup:
        setup.execute_command("ACL", "SETUSER", "cachemw-test", "on", ">s3cret", "~*", "&*", "+@all")
        setup.select(3)
        setup.set("k", "in db 3")
    try:
        url = f"redis://cachemw-test:s3cret@127.0.0.1:{redis_server.port}/3"
        store = RedisStore.from_url(url, timeout=0.2)
        assert store.bounded
        try:
            assert await store.get("k") == b"in db 3"
        finally:
            await store.aclose()
        wrong = RedisStore.from_url(f"redis://cachemw-test:wrong@127.0.0.1:{redis_server.port}/3", timeout=0.2)
        try:
            with pytest.raises(StoreError):
                await wrong.get("k")
        finally:
            await wrong.aclose()
    finally:
        with redis_server.client() as setup:
            setup.execute_command("ACL", "DELUSER", "cachemw-test")
            setup.select(3)
            setup.flushdb()


async def test_unix_socket_url(redis_url: str, redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.unix_url, timeout=0.2)
    try:
        assert store.bounded
        await store.set("k", b"v", 60)
        assert await store.get("k") == b"v"
    finally:
        await store.aclose()


async def test_scripts_survive_a_script_flush(redis_url: str, redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_url, timeout=0.2)
    try:
        token, value, generations = await store.lock("e", 5, ["g1"], "t1")
        assert (token, value, generations) == ("t1", None, (0,))
        with redis_server.client() as setup:
            setup.script_flush()  # as after a restart or failover: EVALSHA now answers NOSCRIPT
        assert await store.fill("e", b"entry", 60, "t1", [], ["g1"], [0]) is True
        assert await store.get("e") == b"entry"
    finally:
        await store.aclose()


async def test_a_wrong_type_under_a_key_is_an_error_not_a_crash(redis_url: str, redis_server: RedisServer) -> None:
    with redis_server.client() as setup:
        setup.rpush("listkey", "x")
    store = RedisStore.from_url(redis_url, timeout=0.2)
    try:
        with pytest.raises(StoreError, match="WRONGTYPE"):
            await store.get("listkey")
        assert await store.get("missing") is None  # the connection is still in step
    finally:
        await store.aclose()


@pytest.fixture
def not_redis() -> Iterator[int]:
    """A TCP server that answers anything with a line that is not RESP."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


async def test_a_server_that_is_not_redis_is_a_store_error(not_redis: int) -> None:
    client = PipelinedRedis(host="127.0.0.1", port=not_redis, timeout=0.5)
    try:
        with pytest.raises(StoreError):
            await client.get("k")
    finally:
        await client.aclose()


async def test_tls_cluster_and_sentinel_urls_take_the_pipelined_path() -> None:
    """Issue 17, item 1: every topology's request path keeps its own budget (test_pipeline_topologies.py
    checks each on real servers)."""
    for url in ("rediss://127.0.0.1:1/0", "redis+cluster://127.0.0.1:1,127.0.0.1:2",
                "redis+sentinel://127.0.0.1:1/mymaster"):
        store = RedisStore.from_url(url, timeout=0.05)
        try:
            assert store.bounded and store.capabilities.keeps_budget
        finally:
            await store.aclose()


async def test_a_deadline_already_past_is_a_timeout_not_a_crash(redis_url: str, redis_server: RedisServer) -> None:
    """#14 item 5: for a deadline already past, uvloop's ``call_at`` returns a plain Handle (no
    ``when()``); a second command then crashed with AttributeError (an HTTP 500) instead of a timeout."""
    client = _connection(redis_server, timeout=1.0)
    try:
        assert await client.get("warm") is None  # connected
        client.timeout = 0.0  # every deadline is already due when its timer is armed (a busy CPU)
        outcomes: list[object] = []

        async def get(i: int) -> None:
            try:
                outcomes.append(await client.get(f"k{i}"))
            except StoreError as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(get, i)
        assert len(outcomes) == 5
        assert all(outcome is None or isinstance(outcome, StoreTimeout) for outcome in outcomes), outcomes
        client.timeout = 1.0
        assert await client.get("warm") is None  # and the connection still answers in order
    finally:
        await client.aclose()


async def test_a_timed_out_command_nobody_awaits_logs_nothing(redis_url: str, redis_server: RedisServer) -> None:
    """#14 item 5: a command whose caller is gone (cancelled in the loop iteration its timeout
    fired) failed its future with nobody to read it: "Future exception was never retrieved"."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    client = _connection(redis_server, timeout=1.0, stuck_after=5)
    try:
        assert await client.get("warm") is None
        connection = client._connection
        assert connection is not None
        # BLPOP on nothing holds the reply back for 0.3 s; the command's budget is 10 ms.
        pending = [connection.send(encode_command(["BLPOP", "nothing-here", "0.3"]), loop.time() + 0.01)]
        await eventually(lambda: _true(pending[0].done()), what="the command timed out")
        pending.clear()  # never awaited: its exception is never read
        gc.collect()
        with anyio.fail_after(2):
            assert await client.get("warm") is None  # the late reply is dropped, not taken for this one
    finally:
        await client.aclose()
        loop.set_exception_handler(previous)
    assert not [c for c in reported if "never retrieved" in str(c.get("message"))], reported


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("stall", [0.15, 0.4], ids=["past the budget", "past stuck_after"])
async def test_a_reply_that_arrived_during_a_stalled_io_callback_is_not_a_timeout(stall: float, budgets: Budgets
                                                                                  ) -> None:
    """uvloop (libuv) runs due timers after an iteration's I/O callbacks, before it polls again:
    after a stall inside an I/O callback (another connection's ``data_received``: a TLS read, a
    burst of requests), a reply already waiting in our socket lost to its own deadline, and a
    stall past ``stuck_after`` closed a connection whose replies had all arrived. asyncio polls
    before it runs the timers that came due meanwhile."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    client = PipelinedRedis(host="127.0.0.1", port=listener.getsockname()[1], timeout=budgets.store_timeout)
    server_side: socket.socket | None = None
    stalling, poke = socket.socketpair()
    transport: asyncio.BaseTransport | None = None
    try:
        first = asyncio.ensure_future(client.get("warm"))
        with anyio.fail_after(budgets.condition):
            server_side, _ = await loop.sock_accept(listener)
            assert (await loop.sock_recv(server_side, 1024)).startswith(b"*2\r\n$3\r\nGET")
        server_side.sendall(b"$-1\r\n")
        assert await first is None
        connection = client._connection
        assert connection is not None
        connection.stuck_after = 0.3
        answer = server_side

        class Stall(asyncio.Protocol):
            """An I/O callback that answers our command, then keeps the loop busy past its deadline."""

            def data_received(self, data: bytes) -> None:
                answer.sendall(b"$2\r\nok\r\n")  # in our socket from now on, unread until the next poll
                time.sleep(stall)

        transport, _ = await loop.create_unix_connection(Stall, sock=stalling)
        # Armed before the stall, whatever the machine's load: the deadline (50 ms) passes during it.
        pending = connection.send(encode_command(["GET", "k"]), loop.time() + 0.05)
        poke.send(b"x")  # the stalling callback runs at the loop's next poll
        with anyio.fail_after(budgets.condition):
            assert await pending == b"ok"
        assert not connection.closed
    finally:
        if transport is not None:
            transport.close()
        poke.close()
        await client.aclose()
        if server_side is not None:
            server_side.close()
        listener.close()


async def test_a_command_our_busy_loop_wrote_late_waits_its_grace_for_the_reply(
        redis_url: str, redis_server: RedisServer, budgets: Budgets) -> None:
    """Issue 15, item 4: a command issued, then the loop busy elsewhere for three budgets before it
    could write it: its budget is spent by us, not by Redis, which answers at once once asked."""
    with redis_server.client() as setup:
        setup.set("k", "v")
    client = _connection(redis_server, timeout=0.05, grace=budgets.store_timeout)
    try:
        assert await client.get("warm") is None  # connected
        for _ in range(3):
            step = asyncio.ensure_future(client.get("k"))
            await anyio.lowlevel.cancel_shielded_checkpoint()  # the command is issued, not yet written
            time.sleep(0.15)  # noqa: ASYNC251  (other work of this process holds the loop meanwhile)
            assert await step == b"v"
    finally:
        await client.aclose()


async def test_a_frozen_server_costs_an_on_time_command_its_budget_and_a_late_one_one_grace(
        redis_url: str, killable: RedisServer) -> None:
    """A store that is really slow: a command the loop sent and watched on time fails at its budget,
    and the store is blamed (no lateness of ours); one our lateness delayed waits its grace once, then
    fails the same way, at the budget and one grace, not at ``stuck_after``."""
    # Budgets longer than the default, so that the machine's own hiccups are well under half of one.
    budget, grace, stall = 0.2, 0.5, 0.6
    client = _connection(killable, timeout=budget, grace=grace, stuck_after=10)
    try:
        assert await client.get("warm") is None  # connected
        killable.pause()
        try:
            started = anyio.current_time()
            with pytest.raises(StoreTimeout) as on_time:
                await client.get("k")
            assert anyio.current_time() - started < budget + grace  # its budget, no grace
            step = asyncio.ensure_future(client.get("k"))
            await anyio.lowlevel.cancel_shielded_checkpoint()
            started = anyio.current_time()
            time.sleep(stall)  # noqa: ASYNC251  (the loop busy: the command is written late)
            with pytest.raises(StoreTimeout) as late:
                await step
            waited = anyio.current_time() - started
            # The stall and one grace. The loop runs a timer up to its clock's resolution early (asyncio and
            # uvloop alike), so "at least" allows a millisecond: seen, 1.0999999999999 for 0.6 + 0.5.
            assert stall + grace - 1e-3 <= waited < stall + 2 * grace + budget, waited
            assert on_time.value.lateness == 0.0  # the store's failure: the loop was on time
            assert late.value.lateness == 0.0  # and during the grace: the store's again
        finally:
            killable.resume()
    finally:
        await client.aclose()
