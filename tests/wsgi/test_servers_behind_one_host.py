"""Several servers of one site behind a load balancer: one Host, one Redis, each its own processes.

Two gunicorn masters (2 workers each) and a uvicorn server; every request carries
the site's Host, as the balancer forwards it, so all of them compute the same keys.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import redis

from tests.helpers import eventually_sync
from tests.servers import gunicorn, uvicorns

HOST = {"Host": "shop.example"}


def _runs(redis_url: str, view: str) -> int:
    with redis.Redis.from_url(redis_url) as counts:
        return int(counts.get(f"calls:{view}") or 0)


def test_two_gunicorn_servers_share_one_fill_and_one_purge(redis_url: str) -> None:
    with gunicorn("tests.apps.flask_shop:app", redis_url, worker_class="gthread", threads=4) as (a, _pa), \
            gunicorn("tests.apps.flask_shop:app", redis_url, worker_class="sync") as (b, _pb):
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda n: httpx.get(f"{(a, b)[n % 2]}/slow/3", headers=HOST, timeout=60),
                                    range(16)))
        assert {answer.json()["run"] for answer in answers} == {1}  # both servers answered with one run's body
        assert _runs(redis_url, "slow") == 1
        httpx.get(f"{a}/items/8", headers=HOST, timeout=30)
        eventually_sync(lambda: httpx.get(f"{b}/items/8", headers=HOST, timeout=30).headers["x-cache"] == "HIT",
                        what="server B hitting server A's entry")
        assert httpx.post(f"{a}/items/8", headers=HOST, timeout=30).json() == {"dropped": 1}
        assert httpx.get(f"{b}/items/8", headers=HOST, timeout=30).headers["x-cache"] == "MISS"
        assert _runs(redis_url, "item") == 2


def test_a_flask_servers_entry_is_a_uvicorn_fastapi_servers_hit(redis_url: str) -> None:
    with gunicorn("tests.apps.flask_shop:app", redis_url) as (flask_base, _process), \
            uvicorns("tests.apps.fastapi_items:app", redis_url, count=1) as [fastapi_base]:
        assert httpx.get(f"{flask_base}/items/5", headers=HOST, timeout=30).headers["x-cache"] == "MISS"
        eventually_sync(lambda: httpx.get(f"{fastapi_base}/items/5", headers=HOST,
                                          timeout=30).headers["x-cache"] == "HIT",
                        what="the FastAPI server hitting the Flask server's entry")
        answer = httpx.get(f"{fastapi_base}/items/5", headers=HOST, timeout=30)
        assert answer.json() == {"item": 5, "run": 1, "q": None}  # the Flask view's body, made once
        assert _runs(redis_url, "item") == 1
