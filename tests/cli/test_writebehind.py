"""``cachemw writebehind``, the installed command: a queue that cannot exist is an error, and ``--app`` works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from cachemw import WriteBehind

SCRIPT = Path(sys.executable).parent / "cachemw"
APP = '''
from starlette.applications import Starlette
from cachemw import CacheMiddleware, WriteBehind

app = Starlette()
app.add_middleware(CacheMiddleware, key_prefix="wbapp", write_behind=[WriteBehind("orders")])
'''


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEMW_", "PYTHON"))}
    return subprocess.run([str(SCRIPT), "writebehind", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60, check=False)


async def _put(redis_url: str, prefix: str, name: str) -> None:
    writes: WriteBehind[Any] = WriteBehind(name, redis_url=redis_url, key_prefix=prefix)
    try:
        await writes.put("user:1", {"items": [1]})
    finally:
        await writes.aclose()


@pytest.mark.parametrize("command", ["status", "dead", "retry"])
def test_an_unknown_queue_is_an_error_naming_what_was_looked_for(redis_url: str, tmp_path: Path,
                                                                 command: str) -> None:
    anyio.run(_put, redis_url, "wbcli", "cart")
    result = run(command, "cartt", "--redis-url", redis_url, "--prefix", "wbcli", cwd=tmp_path)
    assert result.returncode == 1, result.stdout
    assert result.stdout == ""
    assert result.stderr.startswith(f"cachemw: no write-behind queue 'cartt' under the key prefix 'wbcli' at "
                                    f"{redis_url}: Redis holds no trace of it")
    assert "Queues there: cart." in result.stderr
    assert "Traceback" not in result.stderr
    known = run(command, "cart", "--redis-url", redis_url, "--prefix", "wbcli", cwd=tmp_path)
    assert known.returncode == 0, known.stderr


def test_writebehind_takes_the_apps_prefix_and_queues(redis_url: str, tmp_path: Path) -> None:
    (tmp_path / "wb_app_for_cli.py").write_text(APP, encoding="utf-8")
    # Declared by the app's middleware: shown, empty, before its first write.
    result = run("status", "orders", "--app", "wb_app_for_cli:app", "--redis-url", redis_url, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["backlog"] == 0
    # Another queue under the app's prefix is found there, not under the default prefix.
    anyio.run(_put, redis_url, "wbapp", "cart")
    result = run("status", "cart", "--app", "wb_app_for_cli:app", "--redis-url", redis_url, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["backlog"] == 1
    result = run("status", "cart", "--redis-url", redis_url, cwd=tmp_path)
    assert result.returncode == 1
    assert "under the key prefix 'cachemw'" in result.stderr and "HINT" in result.stderr


def test_a_queue_whose_flusher_runs_before_any_write_is_known(redis_url: str, tmp_path: Path) -> None:
    """The app started its flusher (stream and group made) but nothing was written yet: not an unknown queue."""
    import redis

    with redis.Redis.from_url(redis_url) as raw:
        raw.xgroup_create("wbfresh:wb:{cart}:stream", "flushers", id="$", mkstream=True)
    result = run("status", "cart", "--redis-url", redis_url, "--prefix", "wbfresh", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["backlog"] == 0


@pytest.mark.parametrize("app_given", [False, True])
def test_a_url_redis_py_would_misread_is_refused_without_its_password(tmp_path: Path, app_given: bool) -> None:
    (tmp_path / "wb_app_for_cli.py").write_text(APP, encoding="utf-8")
    url = "redis://:sekret@127.0.0.1:1/cart"  # redis-py would take database 0
    result = run("status", "orders", "--redis-url", url, *(("--app", "wb_app_for_cli:app") if app_given else ()),
                 cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("cachemw: redis_url redis://:***@127.0.0.1:1/cart: the path names the database, a "
                             "number (redis://host:6379/0), not 'cart'\n")
