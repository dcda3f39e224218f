"""The Flask shop behind the WSGI CacheMiddleware under real gunicorn (sync and gthread, 2 workers) on real Redis."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from tests.budgets import Budgets
from tests.helpers import eventually_sync
from tests.redis_server import RedisServer
from tests.servers import answers_through_a_kill, gunicorn, stop

APP = "tests.apps.flask_shop:app"
WORKERS = [("sync", 1), ("gthread", 4)]


@pytest.fixture(params=WORKERS, ids=[name for name, _ in WORKERS])
def shop(request: pytest.FixtureRequest, redis_url: str) -> Iterator[str]:
    worker_class, threads = request.param
    with gunicorn(APP, redis_url, worker_class=worker_class, threads=threads) as (base, _process):
        yield base


def _runs(redis_url: str, view: str) -> int:
    with redis.Redis.from_url(redis_url) as counts:
        return int(counts.get(f"calls:{view}") or 0)


def _state(base: str, path: str, **kwargs: object) -> str | None:
    state: str | None = httpx.get(base + path, timeout=30, **kwargs).headers.get("x-cache")  # type: ignore[arg-type]
    return state


def test_a_cold_burst_across_workers_runs_the_view_once(shop: str, redis_url: str) -> None:
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: httpx.get(f"{shop}/slow/1", timeout=60), range(16)))
    assert {answer.status_code for answer in answers} == {200}
    assert {answer.json()["n"] for answer in answers} == {1}
    assert {answer.json()["run"] for answer in answers} == {1}  # every worker answered with the one run's body
    assert _runs(redis_url, "slow") == 1
    eventually_sync(lambda: _state(shop, "/slow/1") == "HIT", what="a hit in whichever worker answers")
    assert _runs(redis_url, "slow") == 1


def test_credentials_are_never_shared_and_private_is_per_user(shop: str, redis_url: str) -> None:
    httpx.get(f"{shop}/feed", timeout=30)
    eventually_sync(lambda: _state(shop, "/feed") == "HIT", what="the public entry stored")
    alice_feed = httpx.get(f"{shop}/feed", headers={"Authorization": "Bearer alice"}, timeout=30)
    assert alice_feed.headers["x-cache"] != "HIT" and alice_feed.json()["auth"] == "Bearer alice"
    for user in ("alice", "bob"):
        answer = httpx.get(f"{shop}/me", headers={"Authorization": f"Bearer {user}"}, timeout=30)
        assert answer.json()["user"] == f"Bearer {user}"
    eventually_sync(lambda: _state(shop, "/me", headers={"Authorization": "Bearer alice"}) == "HIT",
                    what="alice's private entry stored")
    for _ in range(4):
        bob = httpx.get(f"{shop}/me", headers={"Authorization": "Bearer bob"}, timeout=30)
        assert bob.json()["user"] == "Bearer bob"
        alice = httpx.get(f"{shop}/me", headers={"Authorization": "Bearer alice"}, timeout=30)
        assert alice.json()["user"] == "Bearer alice"
    assert httpx.get(f"{shop}/me", timeout=30).json()["user"] == "nobody"


def test_purges_from_a_view_and_from_the_cli_reach_every_worker(shop: str, redis_url: str) -> None:
    for item in (3, 4):
        httpx.get(f"{shop}/items/{item}", timeout=30)
        eventually_sync(lambda item=item: _state(shop, f"/items/{item}") == "HIT",  # type: ignore[misc]
                        what=f"item {item} stored")
    assert httpx.post(f"{shop}/items/3", timeout=30).json() == {"dropped": 1}
    assert _state(shop, "/items/3") == "MISS"  # read-your-writes: the store's entry is gone before the answer
    before = httpx.get(f"{shop}/items/4", timeout=30).json()["run"]
    cli = Path(sys.executable).with_name("cachemw")
    purged = subprocess.run([str(cli), "purge", "--tag", "item:4", "--redis-url", redis_url, "--json"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert purged.returncode == 0 and '"dropped": 1' in purged.stdout, purged.stderr
    # The view runs again for it (each worker drops its in-process copy when the broadcast reaches it).
    eventually_sync(lambda: httpx.get(f"{shop}/items/4", timeout=30).json()["run"] > before,
                    what="item 4 made afresh after the purge")


def test_shutdown_drains_detached_work(redis_url: str, budgets: Budgets) -> None:
    with gunicorn(APP, redis_url, worker_class="gthread", threads=2, workers=1) as (base, process):
        assert httpx.post(f"{base}/later?delay=1", timeout=30).json() == {"taken": True}
        stop(process, timeout=budgets.process_start)
        assert process.returncode == 0
    assert _runs(redis_url, "detached") == 1


@pytest.mark.parametrize("worker_class,threads", WORKERS, ids=[name for name, _ in WORKERS])
def test_redis_killed_mid_traffic_every_request_answers(killable: RedisServer, redis_url: str, worker_class: str,
                                                       threads: int) -> None:
    with gunicorn(APP, killable.url, worker_class=worker_class, threads=threads,
                  env={"CACHEMW_COUNTS_URL": redis_url}) as (base, _process):
        answers_through_a_kill(base, {f"/items/{item}": {"item": item} for item in (1, 2)}, killable.stop)



def test_a_preloaded_app_starts_its_cache_in_each_forked_worker(redis_url: str) -> None:
    """``--preload`` builds the middleware in the master: each worker must start a cache loop of its own."""
    with gunicorn(APP, redis_url, workers=2, preload=True) as (base, _process):
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: httpx.get(f"{base}/slow/2", timeout=60), range(8)))
        assert {answer.json()["run"] for answer in answers} == {1}
        eventually_sync(lambda: _state(base, "/slow/2") == "HIT", what="a hit after the fill")
        states = {httpx.get(f"{base}/slow/2", timeout=30).headers.get("x-cache") for _ in range(10)}
        assert states == {"HIT"}
    assert _runs(redis_url, "slow") == 1


@pytest.mark.parametrize("worker_class,threads", WORKERS, ids=[name for name, _ in WORKERS])
def test_a_frozen_redis_mid_traffic_every_request_answers(killable: RedisServer, redis_url: str, worker_class: str,
                                                         threads: int) -> None:
    """SIGSTOP: connections stay open and nothing answers. Hits in the request thread and the loop's lookups
    each give up within the budget, and the breaker soon sends every request straight to the app."""
    with gunicorn(APP, killable.url, worker_class=worker_class, threads=threads,
                  env={"CACHEMW_COUNTS_URL": redis_url}) as (base, _process):
        try:
            answers_through_a_kill(base, {f"/items/{item}": {"item": item} for item in (1, 2)}, killable.pause)
        finally:
            killable.resume()
