"""The test Django project behind ``cachemw.django.wsgi_application`` under real gunicorn on a real Redis.

Two workers, sync and gthread: one view run per key across the workers, credentials
never shared, private entries per user, purges from a sync view and from the CLI,
and every request answered while Redis is killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from tests.helpers import eventually_sync
from tests.redis_server import RedisServer
from tests.servers import ROOT, answers_through_a_kill, gunicorn

APP = "tests.apps.djangoproject.wsgi:application"
WORKERS = [("sync", 1), ("gthread", 4)]
ENV = {"DJANGO_SETTINGS_MODULE": "tests.apps.djangoproject.settings"}


@pytest.fixture(params=WORKERS, ids=[name for name, _ in WORKERS])
def project(request: pytest.FixtureRequest, redis_url: str) -> Iterator[str]:
    worker_class, threads = request.param
    with gunicorn(APP, redis_url, worker_class=worker_class, threads=threads,
                  env={**ENV, "DJANGO_COUNTS_URL": redis_url}) as (base, _process):
        yield base


def _calls(redis_url: str, name: str) -> int:
    with redis.Redis.from_url(redis_url) as counts:
        return int(counts.get(f"calls:{name}") or 0)


def _state(base: str, path: str, **headers: str) -> str | None:
    state: str | None = httpx.get(base + path, headers=headers, timeout=30).headers.get("x-cache")
    return state


def test_a_cold_burst_across_workers_runs_the_view_once(project: str, redis_url: str) -> None:
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: httpx.get(f"{project}/slow/1/", timeout=60), range(16)))
    assert {answer.status_code for answer in answers} == {200}
    assert {answer.json()["call"] for answer in answers} == {1}
    assert _calls(redis_url, "slow") == 1
    eventually_sync(lambda: _state(project, "/slow/1/") == "HIT", what="a hit in whichever worker answers")


def test_credentials_are_never_shared_and_private_is_per_user(project: str) -> None:
    httpx.get(f"{project}/feed/", timeout=30)
    eventually_sync(lambda: _state(project, "/feed/") == "HIT", what="the public entry stored")
    alice_feed = httpx.get(f"{project}/feed/", headers={"Authorization": "Bearer alice"}, timeout=30)
    assert alice_feed.headers["x-cache"] != "HIT" and alice_feed.json()["auth"] == "Bearer alice"
    httpx.get(f"{project}/me/", headers={"Authorization": "Bearer alice"}, timeout=30)
    eventually_sync(lambda: _state(project, "/me/", Authorization="Bearer alice") == "HIT",
                    what="alice's private entry stored")
    for _ in range(4):
        assert httpx.get(f"{project}/me/", headers={"Authorization": "Bearer bob"},
                         timeout=30).json() == {"user": "Bearer bob"}
        assert httpx.get(f"{project}/me/", headers={"Authorization": "Bearer alice"},
                         timeout=30).json() == {"user": "Bearer alice"}


def test_purges_from_a_sync_view_and_from_the_cli(project: str, redis_url: str) -> None:
    for pk in (3, 4):
        httpx.get(f"{project}/api/items/{pk}/", timeout=30)
        eventually_sync(lambda pk=pk: _state(project, f"/api/items/{pk}/") == "HIT",  # type: ignore[misc]
                        what=f"item {pk} stored")
    assert httpx.post(f"{project}/change/3/", timeout=30).json() == {"dropped": 1}
    assert _state(project, "/api/items/3/") == "MISS"  # the store's entry went before the write's answer
    before = httpx.get(f"{project}/api/items/4/", timeout=30).json()["call"]
    cli = Path(sys.executable).with_name("cachemw")
    purged = subprocess.run([str(cli), "purge", "--tag", "item:4", "--app", APP, "--redis-url", redis_url, "--json"],
                            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
                            env={**os.environ, **ENV, "PYTHONPATH": str(ROOT)})
    assert purged.returncode == 0 and '"dropped": 0' not in purged.stdout, purged.stdout + purged.stderr
    eventually_sync(lambda: httpx.get(f"{project}/api/items/4/", timeout=30).json()["call"] > before,
                    what="item 4 made afresh after the purge")


@pytest.mark.parametrize("worker_class,threads", WORKERS, ids=[name for name, _ in WORKERS])
def test_redis_killed_mid_traffic_every_request_answers(killable: RedisServer, redis_url: str, worker_class: str,
                                                       threads: int) -> None:
    with gunicorn(APP, killable.url, worker_class=worker_class, threads=threads,
                  env={**ENV, "DJANGO_COUNTS_URL": redis_url}) as (base, _process):
        answers_through_a_kill(base, {f"/api/items/{pk}/": {"pk": pk} for pk in (1, 2)}, killable.stop)
