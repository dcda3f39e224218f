"""The ``cachemw`` command, run as an operator runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from cachemw.core.entry import decode_entry, encode_entry
from tests.budgets import Budgets
from tests.helpers import client, eventually_sync, lifespan

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "cachemw"
SAMPLE_CONFIG = REPO / "sample_app" / "cachemw.toml"


def run(*args: str, cwd: Path = REPO, stdout: Any = subprocess.PIPE,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEMW_", "PYTHON"))}
    env.update(extra_env or {})
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=60, check=False)


@cache
def routes_text() -> str:
    result = run("routes", "sample_app:app")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


@cache
def routes_json() -> Any:
    result = run("routes", "sample_app:app", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def row(template: str) -> str:
    [line] = [line for line in routes_text().splitlines() if line.split(" ", 1)[0] == template]
    return line


def json_route(template: str) -> Any:
    [route] = [route for route in routes_json()["routes"] if route["route"] == template]
    return route


def assert_clean_failure(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout
    assert result.stderr.startswith("cachemw: ")


def test_the_console_script_is_installed() -> None:
    assert SCRIPT.is_file(), f"no console script at {SCRIPT}"


def test_help_works() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("routes", "check", "purge", "inspect"):
        assert command in result.stdout
    for command in ("routes", "check", "purge", "inspect"):
        sub = run(command, "--help")
        assert sub.returncode == 0
        assert "usage: cachemw " + command in sub.stdout


def test_no_command_is_a_usage_error() -> None:
    result = run()
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert "Traceback" not in result.stderr


# -- cachemw routes ---------------------------------------------------------------------------


def test_routes_shows_the_decorated_product_route() -> None:
    line = row("/products/{id:int}")
    assert "minutes" in line
    assert "ttl=2m" in line
    assert line.rstrip().endswith("decorator")


def test_routes_shows_the_file_rule_for_stats() -> None:
    line = row("/stats")
    assert "hours" in line
    assert "ttl=1h" in line
    assert line.rstrip().endswith("cachemw.toml rule 1")


def test_routes_shows_the_cart_as_realtime() -> None:
    line = row("/cart")
    assert "realtime (not cached)" in line
    assert line.rstrip().endswith("cachemw.toml rule 2")
    assert "realtime (not cached)" in row("/cart/items")


def test_routes_shows_the_fastapi_route_under_its_mount() -> None:
    line = row("/api/products/{product_id}")
    assert "ttl=5m" in line
    assert line.rstrip().endswith("decorator")


@pytest.mark.parametrize("template", ["/", "/debug/queries", "/api/openapi.json"])
def test_routes_shows_uncached_routes_as_default(template: str) -> None:
    line = row(template)
    assert line.rstrip().endswith("default")
    assert " - " in line


def test_routes_names_the_config_and_the_store() -> None:
    assert f"config: {SAMPLE_CONFIG}" in routes_text()
    assert "store: memory" in routes_text()


def test_routes_json_has_the_same_facts() -> None:
    data = routes_json()
    assert data["config"] == str(SAMPLE_CONFIG)
    text_templates = [line.split(" ", 1)[0] for line in routes_text().splitlines()[1:] if line.startswith("/")]
    assert [route["route"] for route in data["routes"]] == text_templates

    product = json_route("/products/{id:int}")
    assert product["source"] == "decorator"
    assert product["policy"]["preset"] == "minutes"
    assert product["policy"]["cached"] is True
    assert product["policy"]["ttl"] == 120
    assert product["policy"]["tags"] == ["product:{id}"]
    assert "GET" in product["methods"]

    stats = json_route("/stats")
    assert stats["source"].endswith("cachemw.toml rule 1")
    assert stats["policy"]["preset"] == "hours"
    assert stats["policy"]["ttl"] == 3600

    cart = json_route("/cart")
    assert cart["source"].endswith("cachemw.toml rule 2")
    assert cart["policy"]["preset"] == "realtime"
    assert cart["policy"]["cached"] is False

    api = json_route("/api/products/{product_id}")
    assert api["source"] == "decorator"
    assert api["policy"]["ttl"] == 300
    assert api["policy"]["tags"] == ["product:{product_id}"]

    queries = json_route("/debug/queries")
    assert queries["source"] == "default"
    assert queries["policy"] is None


def test_routes_works_from_another_directory(tmp_path: Path) -> None:
    # A dotted module path, found on PYTHONPATH rather than in the working directory (the sample
    # app is not installed: it runs from a checkout).
    result = run("routes", "sample_app.app:app", cwd=tmp_path, extra_env={"PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "/products/{id:int}" in result.stdout


def test_routes_with_another_config(tmp_path: Path) -> None:
    config = tmp_path / "cachemw.toml"
    config.write_text('[cachemw]\n[[cachemw.rules]]\nroute = "/debug/queries"\npolicy = "days"\n', encoding="utf-8")
    result = run("routes", "sample_app:app", "--config", str(config))
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("/debug/queries ")]
    assert "days" in line
    assert line.rstrip().endswith(f"{config} rule 1")
    [stats] = [line for line in result.stdout.splitlines() if line.startswith("/stats ")]
    assert stats.rstrip().endswith("default")


HOST_AND_KEYS_APP = """
from fastapi import Depends, FastAPI
from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.responses import PlainTextResponse
from starlette.routing import Host, Mount, Route, Router

from cachemw import cache

async def api(request):
    return PlainTextResponse("api")

@cache(ttl="5m")
async def page(request):
    return PlainTextResponse("page")

app = FastAPI()

@app.get("/keyed", dependencies=[Depends(APIKeyHeader(name="X-API-Key")), Depends(HTTPBearer())])
@cache(ttl="5m")
async def keyed():
    return "ok"

app.router.routes.append(Mount("/h", routes=[Host("api.test", app=Router([Route("/secret", api)])),
                                             Route("/{p:path}", page)]))
"""


def test_routes_shows_unmodellable_routes_and_route_credentials(tmp_path: Path) -> None:
    (tmp_path / "host_and_keys.py").write_text(HOST_AND_KEYS_APP, encoding="utf-8")
    result = run("routes", "host_and_keys:app", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    keyed = next(index for index, line in enumerate(lines) if line.startswith("/keyed "))
    assert lines[keyed + 1].split() == ["credentials:", "header", "x-api-key,", "header", "authorization"]
    [warning] = [line for line in lines if line.startswith("warning:")]
    assert "Host('api.test') under /h" in warning and "never cached" in warning and "/h/{p:path}" in warning

    data = json.loads(run("routes", "host_and_keys:app", "--json", cwd=tmp_path).stdout)
    [route] = [route for route in data["routes"] if route["route"] == "/keyed"]
    assert route["credentials"] == [{"in": "header", "name": "x-api-key"}, {"in": "header", "name": "authorization"}]
    assert data["warnings"] == [warning.removeprefix("warning: ")]


def test_routes_into_a_closed_pipe_is_not_a_traceback() -> None:
    # `cachemw routes app --json | head -1`: the reader leaves before the output is written.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = run("routes", "sample_app:app", "--json", stdout=write_end)
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr
    assert "BrokenPipeError" not in result.stderr


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nosuchmodule:app", "cannot import 'nosuchmodule'"),
        ("sample_app:nosuchapp", "has no attribute 'nosuchapp'"),
        ("sample_app", "expected MODULE:ATTRIBUTE"),
        ("sample_app.db:KINDS", "has no routes"),
    ],
)
def test_routes_of_a_bad_app_path_is_a_clear_error(target: str, message: str) -> None:
    result = run("routes", target)
    assert result.returncode == 2  # a usage error, as the README says
    assert_clean_failure(result)
    assert message in result.stderr
    assert result.stdout == ""


def test_routes_of_an_app_that_fails_at_import_says_where_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken_app_for_cli.py").write_text(
        'import os\n\nDATABASE_URL = os.environ["NO_SUCH_VARIABLE_FOR_CLI"]\n', encoding="utf-8")
    result = run("routes", "broken_app_for_cli:app", cwd=tmp_path)
    assert result.returncode == 2
    assert_clean_failure(result)
    assert "cannot import 'broken_app_for_cli': it raised KeyError: 'NO_SUCH_VARIABLE_FOR_CLI'" in result.stderr
    assert f"{tmp_path / 'broken_app_for_cli.py'}:3" in result.stderr


# -- cachemw check ----------------------------------------------------------------------------


def test_check_accepts_the_sample_config() -> None:
    result = run("check", str(SAMPLE_CONFIG))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{SAMPLE_CONFIG}: ok")
    assert "2 rule(s)" in result.stdout


def test_check_accepts_the_sample_config_against_its_app() -> None:
    result = run("check", str(SAMPLE_CONFIG), "--app", "sample_app:app")
    assert result.returncode == 0, result.stderr
    assert ": ok" in result.stdout


@pytest.mark.parametrize(
    ("rules", "field", "value"),
    [
        ('[[cachemw.rules]]\nroute = "/stats"\nttl = "5m"\n[[cachemw.rules]]\nroute = "/x"\nttl = "soon"\n',
         "ttl", "soon"),
        ('[[cachemw.rules]]\nroute = "/stats"\nttl = "5m"\n[[cachemw.rules]]\nroute = "/x"\npolicy = "weekly"\n',
         "policy", "weekly"),
        ('[[cachemw.rules]]\nroute = "/stats"\nttl = "5m"\n[[cachemw.rules]]\nroute = "/x"\nttl = "5m"\nttll = "5m"\n',
         "ttll", "ttll"),
        ('[[cachemw.rules]]\nroute = "/stats"\nttl = "5m"\n[[cachemw.rules]]\nroute = "/x"\nvary = ["bad header"]\n',
         "vary", "bad header"),
    ],
    ids=["duration", "preset", "unknown-field", "vary"],
)
def test_check_names_the_file_the_rule_and_the_field(tmp_path: Path, rules: str, field: str, value: str) -> None:
    config = tmp_path / "cachemw.toml"
    config.write_text("[cachemw]\n" + rules, encoding="utf-8")
    result = run("check", str(config))
    assert result.returncode == 2
    assert_clean_failure(result)
    assert str(config) in result.stderr
    assert "rule 2" in result.stderr
    assert f"'{field}'" in result.stderr
    assert value in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "text",
    ["[cachemw\n", "[other]\nx = 1\n", "[cachemw]\nkey_prefix = 'has spaces'\n", "[cachemw]\nrules = 3\n"],
    ids=["not-toml", "no-table", "bad-setting", "bad-rules"],
)
def test_check_rejects_a_bad_file_without_a_traceback(tmp_path: Path, text: str) -> None:
    config = tmp_path / "cachemw.toml"
    config.write_text(text, encoding="utf-8")
    result = run("check", str(config))
    assert result.returncode == 2
    assert_clean_failure(result)
    assert str(config) in result.stderr


def test_check_of_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = run("check", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert_clean_failure(result)
    assert "nope.toml: no such file" in result.stderr


def test_check_with_app_names_a_rule_that_matches_no_route(tmp_path: Path) -> None:
    config = tmp_path / "cachemw.toml"
    config.write_text('[cachemw]\n[[cachemw.rules]]\nroute = "/stats"\npolicy = "hours"\n'
                      '[[cachemw.rules]]\nroute = "/statz"\npolicy = "hours"\n', encoding="utf-8")
    assert run("check", str(config)).returncode == 0  # without the app there is nothing to match
    result = run("check", str(config), "--app", "sample_app:app")
    assert result.returncode == 2
    assert_clean_failure(result)
    assert str(config) in result.stderr
    assert "rule 2" in result.stderr
    assert "'/statz'" in result.stderr
    assert "matches no route" in result.stderr
    assert "/stats" in result.stderr  # the routes it could have meant


def test_check_with_an_app_wrapped_in_the_middleware(tmp_path: Path) -> None:
    (tmp_path / "wrapped_app.py").write_text(
        "from starlette.applications import Starlette\n"
        "from starlette.responses import PlainTextResponse\n"
        "from starlette.routing import Route\n"
        "from cachemw import CacheMiddleware\n\n"
        "async def hello(request):\n"
        "    return PlainTextResponse('hi')\n\n"
        "app = CacheMiddleware(Starlette(routes=[Route('/hello', hello)]))\n",
        encoding="utf-8",
    )
    config = tmp_path / "cachemw.toml"
    config.write_text('[cachemw]\n[[cachemw.rules]]\nroute = "/hello"\nttl = "5m"\n', encoding="utf-8")
    result = run("check", str(config), "--app", "wrapped_app:app", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    routes = run("routes", "wrapped_app:app", "--config", str(config), cwd=tmp_path)
    assert routes.returncode == 0, routes.stderr
    assert "/hello" in routes.stdout


@pytest.mark.parametrize("url", ["redis://host:6391:0", "redis://:s3cret@host:6391:0", "redis://h:99999/0"])
def test_check_rejects_a_store_url_that_startup_rejects(tmp_path: Path, url: str) -> None:
    from starlette.applications import Starlette

    from cachemw import CacheMiddleware, ConfigError

    config = tmp_path / "cachemw.toml"
    config.write_text(f'[cachemw]\nredis_url = "{url}"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as startup:  # what the app's startup says of this file
        CacheMiddleware(Starlette(), config=str(config)).prepare(None)
    result = run("check", str(config))
    assert result.returncode == 2, result.stdout
    assert_clean_failure(result)
    assert f"{config}: field 'redis_url'" in result.stderr
    assert str(startup.value).rsplit(": ", 1)[1] in result.stderr  # the same validation's own words
    assert "s3cret" not in result.stderr
    assert result.stdout == ""


def test_check_does_not_connect_to_the_store(tmp_path: Path) -> None:
    config = tmp_path / "cachemw.toml"
    config.write_text('[cachemw]\nredis_url = "redis://127.0.0.1:1/0"\n', encoding="utf-8")  # nothing listens
    result = run("check", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: ok")


def test_check_with_a_bad_app_path_is_a_clear_error() -> None:
    result = run("check", str(SAMPLE_CONFIG), "--app", "nosuchmodule:app")
    assert result.returncode == 2
    assert_clean_failure(result)
    assert "cannot import 'nosuchmodule'" in result.stderr


@pytest.mark.parametrize(
    ("content", "shown"),
    [
        (b"\xff\xfe[\x00c\x00", "not valid TOML: not UTF-8 text"),  # saved as UTF-16
        (b'[cachemw]\nredis_url = "redis://:sekret@[::1:6379/0"\n', "'redis://***@[::1:6379/0': Invalid IPv6 URL"),
        (b'[cachemw]\nredis_url = "redis:/:sekret@cache:6379/0"\n', "'redis:/***@cache:6379/0' is not valid"),
        (b'[cachemw]\nredis_url = "redis://:sekret@cache:6379/O"\n', "the path names the database, a number"),
    ],
)
def test_check_of_a_broken_file_or_url_exits_2_in_one_line_without_the_password(
        tmp_path: Path, content: bytes, shown: str) -> None:
    config = tmp_path / "cachemw.toml"
    config.write_bytes(content)
    result = run("check", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert_clean_failure(result)
    assert shown in result.stderr
    assert "sekret" not in result.stderr + result.stdout
    assert result.stderr.count("\n") == 1


def test_operator_commands_refuse_a_misread_redis_url_without_the_password() -> None:
    result = run("purge", "--all", "--redis-url", "redis://:sekret@127.0.0.1:1/cache")
    assert result.returncode == 2
    assert_clean_failure(result)
    assert "the path names the database" in result.stderr
    assert "sekret" not in result.stderr


# -- cachemw purge and cachemw inspect: entries the sample app stored in a private Redis -----------

BASE = "http://testserver"
FILLED = ("/products/1", "/products/2", "/stats", "/api/products/3")


async def _fill_through_the_app(db_path: Path, paths: Sequence[str]) -> None:
    from sample_app import create_app

    app = create_app(db_path=db_path, db_delay=0)
    state: dict[str, Any] = {}

    async def served(scope: Any, receive: Any, send: Any) -> None:
        # What a server does and httpx's transport does not: hand the lifespan's state to each request.
        await app({**scope, "state": state if scope["type"] == "lifespan" else dict(state)}, receive, send)

    # With the lifespan the fills run in the background; its shutdown waits for them.
    async with lifespan(served), client(served) as http:
        for path in paths:
            response = await http.get(path)
            assert response.status_code == 200, (path, response.text)
            assert response.headers["x-cache"] == "MISS", path


@pytest.fixture
def filled(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The private Redis, holding the sample app's entries for FILLED; returns its URL."""
    monkeypatch.setenv("CACHEMW_REDIS_URL", redis_url)  # the app's middleware reads it at startup
    anyio.run(_fill_through_the_app, tmp_path / "sample.sqlite3", FILLED)
    with redis.Redis.from_url(redis_url) as direct:
        assert len(direct.keys("cachemw-sample:e:*")) == len(FILLED)
    return redis_url


def inspect(url: str, redis_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run("inspect", url, "--app", "sample_app:app", "--redis-url", redis_url, *extra)


def inspect_json(path: str, redis_url: str, *extra: str) -> Any:
    result = inspect(BASE + path, redis_url, "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def state_of(path: str, redis_url: str) -> str:
    state: str = inspect_json(path, redis_url)["state"]
    return state


def purge(redis_url: str, *args: str) -> int:
    result = run("purge", *args, "--app", "sample_app:app", "--redis-url", redis_url, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    dropped: int = json.loads(result.stdout)["dropped"]
    return dropped


def fields(text: str) -> dict[str, str]:
    """The ``label value`` lines of inspect's text output (continuation lines skipped)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith(" "):
            label, _, value = line.partition(" ")
            found[label] = value.strip()
    return found


def test_inspect_shows_a_fresh_entry(filled: str) -> None:
    result = inspect(BASE + "/products/1", filled)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    shown = fields(result.stdout)
    assert shown["state"] == "fresh"
    assert shown["key"].startswith("cachemw-sample:e:/products/<id>:{")
    assert shown["route"].startswith("/products/{id:int}")
    assert shown["status"] == "200"
    assert "product:1" in shown["tags"].split(", ")
    assert shown["etag"].startswith(('"', 'W/"'))
    assert "content-type: application/json" in result.stdout


def test_inspect_json_has_the_same_facts(filled: str) -> None:
    data = inspect_json("/products/1", filled)
    assert data["state"] == "fresh"
    assert data["route"] == "/products/{id:int}"
    assert data["key"].startswith("cachemw-sample:e:/products/<id>:{")
    assert data["status"] == 200
    assert 0 <= data["age"] < 60
    assert 60 < data["ttl_left"] <= 120
    assert set(data["tags"]) >= {"product:1", "route:/products/{id}", "path:/products/1"}
    headers = dict(data["headers"])
    assert headers["content-type"] == "application/json"
    assert data["size"] == int(headers["content-length"]) > 0
    assert headers["etag"] == data["etag"]
    with redis.Redis.from_url(filled) as direct:
        stored = direct.get(data["key"])  # the key inspect computed is the one the middleware wrote
    assert stored is not None
    assert decode_entry(stored).etag.decode() == data["etag"]


def test_inspect_finds_a_file_rule_and_a_mounted_route(filled: str) -> None:
    stats = inspect_json("/stats", filled)
    assert stats["state"] == "fresh"
    assert stats["route"] == "/stats"
    assert 3500 < stats["ttl_left"] <= 3600
    api = inspect_json("/api/products/3", filled)
    assert api["state"] == "fresh"
    assert "product:3" in api["tags"]


def test_inspect_keys_what_the_middleware_keys(filled: str) -> None:
    # A header the route does not vary on leaves the key alone; a query string or another host does not.
    assert state_of("/products/1", filled) == "fresh"
    assert inspect_json("/products/1", filled, "-H", "Accept: text/html")["state"] == "fresh"
    assert inspect_json("/products/1", filled, "-H", "accept-language:fr")["state"] == "fresh"
    assert state_of("/products/1?utm=x", filled) == "absent"
    result = inspect("http://other.example/products/1", filled, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "absent"
    # The default port is not part of what a client sends as Host.
    result = inspect("http://testserver:80/products/1", filled, "--json")
    assert json.loads(result.stdout)["state"] == "fresh"
    assert state_of("/products/4", filled) == "absent"


def test_inspect_of_an_absent_entry(redis_url: str) -> None:
    result = inspect(BASE + "/products/1", redis_url)
    assert result.returncode == 0, result.stderr
    shown = fields(result.stdout)
    assert shown["state"] == "absent"
    assert shown["key"].startswith("cachemw-sample:e:/products/<id>:{")
    assert "status" not in shown
    data = inspect_json("/products/1", redis_url)
    assert data["state"] == "absent"
    assert data["status"] is None
    assert data["tags"] == []


@pytest.mark.parametrize(
    ("age", "state"),
    # minutes: ttl 2m, stale_while_revalidate 10m, stale_if_error 1h
    [(130, "stale"), (1000, "stale-if-error"), (5000, "expired")],
)
def test_inspect_shows_stale_states(filled: str, age: float, state: str) -> None:
    key = inspect_json("/products/2", filled)["key"]
    with redis.Redis.from_url(filled) as direct:
        entry = decode_entry(direct.get(key))
        aged = encode_entry(type(entry)(entry.status, entry.headers, entry.body, entry.stored_at - age,
                                        entry.etag, entry.tags))
        direct.set(key, aged)
    data = inspect_json("/products/2", filled)
    assert data["state"] == state
    assert data["ttl_left"] < 0
    result = inspect(BASE + "/products/2", filled)
    shown = fields(result.stdout)
    assert shown["state"] == state
    assert shown["ttl"].startswith("-")


def test_inspect_of_a_corrupt_value(filled: str) -> None:
    key = inspect_json("/products/1", filled)["key"]
    with redis.Redis.from_url(filled) as direct:
        direct.set(key, b"not an entry at all")
    result = inspect(BASE + "/products/1", filled)
    assert result.returncode == 0, result.stderr
    assert fields(result.stdout)["state"] == "corrupt (not a cachemw entry)"
    data = inspect_json("/products/1", filled)
    assert data["state"] == "corrupt (not a cachemw entry)"
    assert data["status"] is None


@pytest.mark.parametrize("path", ["/debug/queries", "/nowhere", "/"])
def test_inspect_of_a_url_without_policy(redis_url: str, path: str) -> None:
    result = inspect(BASE + path, redis_url)
    assert result.returncode == 1
    assert_clean_failure(result)
    assert f"no cache policy for {path}" in result.stderr
    assert result.stdout == ""


def test_inspect_of_a_realtime_route(redis_url: str) -> None:
    result = inspect(BASE + "/cart", redis_url)
    assert result.returncode == 1
    assert_clean_failure(result)
    assert "no cache policy for /cart" in result.stderr
    assert "never cached" in result.stderr


@pytest.mark.parametrize("header", ["Cookie: session=abcdefghijklmnopqr", "Authorization: Bearer x"])
def test_inspect_refuses_credentials_on_a_shared_route(filled: str, header: str) -> None:
    result = inspect(BASE + "/products/1", filled, "-H", header)
    assert result.returncode == 1
    assert_clean_failure(result)
    assert "shared" in result.stderr
    assert "credentials" in result.stderr
    assert result.stdout == ""
    # Another cookie is no credential.
    assert inspect_json("/products/1", filled, "-H", "Cookie: theme=dark")["state"] == "fresh"


@pytest.mark.parametrize(
    ("url", "extra", "message"),
    [
        ("/products/1", (), "not an absolute http(s) URL"),
        ("ftp://testserver/products/1", (), "not an absolute http(s) URL"),
        ("http://testserver:99999/products/1", (), "port"),
        (BASE + "/products/1", ("-H", "no colon here"), "expected a header as 'Name: value'"),
        (BASE + "/products/1", ("-H", "bad name: x"), "expected a header as 'Name: value'"),
    ],
    ids=["relative", "scheme", "port", "header", "header-name"],
)
def test_inspect_of_a_bad_request_is_a_usage_error(redis_url: str, url: str, extra: tuple[str, ...],
                                                   message: str) -> None:
    result = inspect(url, redis_url, *extra)
    assert result.returncode == 2
    assert_clean_failure(result)
    assert message in result.stderr


def test_inspect_needs_an_app() -> None:
    result = run("inspect", BASE + "/products/1")
    assert result.returncode == 2
    assert "--app" in result.stderr
    assert "Traceback" not in result.stderr


def test_purge_by_tag_then_route_then_url_then_all(filled: str) -> None:
    assert purge(filled, "--tag", "product:1") == 1
    assert state_of("/products/1", filled) == "absent"
    assert state_of("/products/2", filled) == "fresh"
    assert state_of("/api/products/3", filled) == "fresh"

    assert purge(filled, "--route", "/products/{id}") == 1  # what remains of the route: /products/2
    assert state_of("/products/2", filled) == "absent"
    assert state_of("/stats", filled) == "fresh"

    assert purge(filled, "--url", BASE + "/stats") == 1
    assert state_of("/stats", filled) == "absent"
    assert state_of("/api/products/3", filled) == "fresh"

    assert purge(filled, "--all") == 1
    assert state_of("/api/products/3", filled) == "absent"
    assert purge(filled, "--all") == 0


def test_purge_all_drops_everything(filled: str) -> None:
    assert purge(filled, "--all") == len(FILLED)
    for path in FILLED:
        assert state_of(path, filled) == "absent"
    with redis.Redis.from_url(filled) as direct:
        assert direct.keys("cachemw-sample:e:*") == []


def test_purge_by_route_as_declared_or_normalised(filled: str) -> None:
    assert purge(filled, "--route", "/products/{id:int}") == 2
    assert purge(filled, "--route", "/api/products/{product_id}") == 1
    assert state_of("/stats", filled) == "fresh"


def test_purge_by_repeated_tags_and_by_a_tag_of_two_routes(filled: str) -> None:
    assert purge(filled, "--tag", "product:2", "--tag", "product:3", "--tag", "product:9") == 2
    assert state_of("/products/1", filled) == "fresh"
    assert state_of("/products/2", filled) == "absent"
    assert state_of("/api/products/3", filled) == "absent"


def test_purge_by_url_ignores_the_query_and_decodes_the_path(filled: str) -> None:
    assert purge(filled, "--url", BASE + "/products/2?utm=x") == 1
    # The app sees (and entries are tagged with) the decoded path: %31 is "1".
    assert purge(filled, "--url", "/products/%31") == 1
    assert state_of("/products/1", filled) == "absent"
    assert state_of("/stats", filled) == "fresh"


def test_purge_soft_marks_entries_stale_and_drops_those_without_a_stale_window(filled: str) -> None:
    result = run("purge", "--soft", "--tag", "product:1", "--tag", "product:3", "--app", "sample_app:app",
                 "--redis-url", filled, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"dropped": 2, "prefix": "cachemw-sample", "soft": True}
    assert state_of("/products/1", filled) == "stale"  # "minutes": served stale while one refresh runs
    assert state_of("/api/products/3", filled) == "absent"  # ttl 5m and no stale_while_revalidate: gone
    assert state_of("/products/2", filled) == "fresh"
    result = run("purge", "--soft", "--all", "--redis-url", filled, "--app", "sample_app:app")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("marked 3 entries (all entries) stale (dropped those without a stale window), "
                             "under the key prefix 'cachemw-sample'\n")
    assert [state_of(path, filled) for path in ("/products/1", "/products/2", "/stats")] == ["stale"] * 3
    assert "--soft" in run("purge", "--help").stdout


def test_purge_text_output(filled: str) -> None:
    result = run("purge", "--tag", "product:1", "--redis-url", filled, "--app", "sample_app:app")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "dropped 1 entry tagged product:1, under the key prefix 'cachemw-sample'\n"
    result = run("purge", "--tag", "product:1", "--redis-url", filled, "--app", "sample_app:app")
    assert result.stdout == "dropped 0 entries tagged product:1, under the key prefix 'cachemw-sample'\n"
    result = run("purge", "--route", "/products/{id}", "--redis-url", filled, "--app", "sample_app:app")
    assert result.stdout == "dropped 1 entry of route /products/{id}, under the key prefix 'cachemw-sample'\n"


def test_purge_takes_the_prefix_from_the_config(filled: str, tmp_path: Path) -> None:
    # Without the app (or its config) the prefix is the default one, under which nothing is stored here:
    # said, and not a success.
    result = run("purge", "--all", "--redis-url", filled, "--json")
    assert result.returncode == 1, result.stdout
    assert_clean_failure(result)
    assert result.stdout == ""
    assert ("nothing is stored under the key prefix 'cachemw' at " + filled) in result.stderr
    assert "HINT: pass --app (or --config)" in result.stderr
    result = run("purge", "--all", "--config", str(SAMPLE_CONFIG), "--redis-url", filled, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"dropped": len(FILLED), "prefix": "cachemw-sample"}


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [(("--route", "/prodcts/{id}"), 2, "--route '/prodcts/{id}' names no route of sample_app:app; its cached "
                                       "routes are: /api/products/{product_id}, /products/{id:int}, /stats"),
     (("--route", "/cart"), 1, "--route '/cart': the route /cart has no cache policy that stores entries"),
     (("--route", "/debug/queries"), 1, "the route /debug/queries has no cache policy"),
     (("--url", "/nowhere/1"), 1, "--url '/nowhere/1': /nowhere/1 is on no cached route of sample_app:app"),
     (("--url", BASE + "/cart"), 1, "/cart is on no cached route")],
    ids=["unknown-route", "realtime-route", "uncached-route", "unknown-url", "uncached-url"],
)
def test_purge_of_what_cannot_have_entries_fails(filled: str, args: tuple[str, ...], status: int,
                                                 message: str) -> None:
    result = run("purge", *args, "--app", "sample_app:app", "--redis-url", filled)
    assert result.returncode == status, result.stdout
    assert_clean_failure(result)
    assert message in result.stderr
    assert result.stdout == ""
    with redis.Redis.from_url(filled) as direct:
        assert len(direct.keys("cachemw-sample:e:*")) == len(FILLED)  # nothing was purged


def test_purge_reads_the_redis_url_from_the_environment(filled: str) -> None:
    result = run("purge", "--tag", "product:1", "--app", "sample_app:app", "--json",
                 extra_env={"CACHEMW_REDIS_URL": filled})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"dropped": 1, "prefix": "cachemw-sample"}


@pytest.mark.parametrize("app", [(), ("--app", "sample_app:app")], ids=["defaults", "app"])
def test_purge_without_redis_is_a_clear_error(app: tuple[str, ...]) -> None:
    result = run("purge", "--tag", "product:1", *app)
    assert result.returncode == 2
    assert_clean_failure(result)
    assert result.stderr.strip() == ("cachemw: no redis_url configured: the memory store lives inside the app "
                                     "process; nothing to purge from here")
    assert result.stdout == ""


def test_inspect_without_redis_is_a_clear_error() -> None:
    result = run("inspect", BASE + "/products/1", "--app", "sample_app:app")
    assert result.returncode == 2
    assert_clean_failure(result)
    assert "no redis_url configured" in result.stderr
    assert "nothing to inspect from here" in result.stderr


@pytest.mark.parametrize(
    "command",
    [("purge", "--all"), ("purge", "--tag", "product:1"), ("inspect", BASE + "/products/1")],
    ids=["purge-all", "purge-tag", "inspect"],
)
def test_unreachable_redis_is_a_clear_error(command: tuple[str, ...]) -> None:
    result = run(*command, "--app", "sample_app:app", "--redis-url", "redis://:secret@127.0.0.1:1/0")
    assert result.returncode == 2
    assert_clean_failure(result)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "127.0.0.1:1" in result.stderr
    assert "secret" not in result.stderr
    assert result.stdout == ""


def test_a_bad_redis_url_is_a_clear_error() -> None:
    result = run("purge", "--all", "--redis-url", "http://127.0.0.1:1/")
    assert result.returncode == 2
    assert_clean_failure(result)
    assert "unsupported store URL scheme" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "one of the arguments --tag --route --url --all is required"),
        (("--tag", "a", "--all"), "not allowed with argument"),
    ],
    ids=["nothing", "two"],
)
def test_purge_needs_exactly_one_target(args: tuple[str, ...], message: str) -> None:
    result = run("purge", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [(("--route", "products/{id}"), "expected a route template"), (("--url", "products/1"), "expected a URL"),
     (("--tag", ""), "cannot be empty")],
    ids=["route", "url", "tag"],
)
def test_purge_of_a_bad_target_is_a_clear_error(redis_url: str, args: tuple[str, ...], message: str) -> None:
    result = run("purge", *args, "--redis-url", redis_url)
    assert result.returncode == 2
    assert_clean_failure(result)
    assert message in result.stderr


PRIVATE_APP = '''
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from cachemw import CacheMiddleware, cache

@cache(ttl="5m", private=True)
async def me(request: Request) -> PlainTextResponse:
    return PlainTextResponse("you")

def by_user(conn):
    return conn.headers.get("x-user")

app = Starlette(routes=[Route("/me", me)])
app.add_middleware(CacheMiddleware, key_prefix="priv")
custom = Starlette(routes=[Route("/me", me)])
custom.add_middleware(CacheMiddleware, key_prefix="custom", identity=by_user)
'''


async def _fill_private(module: Any, redis_url: str) -> None:
    for app, headers in ((module.app, {"cookie": "session=alice"}), (module.custom, {"x-user": "bob"})):
        async with lifespan(app), client(app) as http:
            response = await http.get("/me", headers=headers)
            assert response.status_code == 200
            assert response.headers["x-cache"] == "MISS"


def test_inspect_of_private_entries(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "private_app_for_cli.py").write_text(PRIVATE_APP, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CACHEMW_REDIS_URL", redis_url)
    module = importlib.import_module("private_app_for_cli")
    anyio.run(_fill_private, module, redis_url)

    def look(app: str, *headers: str) -> subprocess.CompletedProcess[str]:
        return run("inspect", BASE + "/me", "--app", f"private_app_for_cli:{app}", "--redis-url", redis_url,
                   "--json", *headers, cwd=tmp_path)

    # The default identity: the session cookie; the middleware's key_prefix argument is honoured.
    result = look("app", "-H", "Cookie: session=alice")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["state"] == "fresh"
    assert data["key"].startswith("priv:e:/me:{")
    assert json.loads(look("app", "-H", "Cookie: session=mallory").stdout)["state"] == "absent"
    refused = look("app")
    assert refused.returncode == 1
    assert_clean_failure(refused)
    assert "private" in refused.stderr
    assert "Cookie: session=" in refused.stderr
    # A custom identity is the app's own function, called on the request inspect builds.
    result = look("custom", "-H", "X-User: bob")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["state"] == "fresh"
    assert data["key"].startswith("custom:e:/me:{")
    assert json.loads(look("custom", "-H", "X-User: alice").stdout)["state"] == "absent"


FLASK_PRIVATE_APP = '''
from flask import Flask
from cachemw import cache
from cachemw.wsgi import CacheMiddleware

app = Flask(__name__)

@app.get("/me")
@cache(ttl="5m", private=True)
def me() -> str:
    return "you"

def by_user(environ):  # a WSGI app's identity reads the environ
    return environ.get("HTTP_X_USER")

app.wsgi_app = CacheMiddleware(app.wsgi_app, key_prefix="wpriv", identity=by_user)
'''


def test_inspect_of_a_private_entry_of_a_wsgi_app_whose_identity_reads_the_environ(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budgets: Budgets) -> None:
    (tmp_path / "flask_private_for_cli.py").write_text(FLASK_PRIVATE_APP, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CACHEMW_REDIS_URL", redis_url)
    module = importlib.import_module("flask_private_for_cli")
    try:
        answer = module.app.test_client().get("/me", base_url=BASE, headers={"X-User": "bob"})
        assert (answer.status_code, answer.headers["x-cache"]) == (200, "MISS")
        with redis.Redis.from_url(redis_url) as db:
            eventually_sync(lambda: bool(db.keys("wpriv:e:*")), within=budgets.condition, what="the fill")
    finally:
        module.app.wsgi_app.close()

    def look(*headers: str) -> subprocess.CompletedProcess[str]:
        return run("inspect", BASE + "/me", "--app", "flask_private_for_cli:app", "--redis-url", redis_url,
                   "--json", *headers, cwd=tmp_path)

    result = look("-H", "X-User: bob")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "fresh"
    assert json.loads(look("-H", "X-User: alice").stdout)["state"] == "absent"


# -- cachemw stats: the fleet's counters from Redis ------------------------------------------------

FLEET_APP = '''
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from cachemw import CacheMiddleware, cache

@cache(ttl="5m", tags=["item:{id}"])
async def item(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"item {request.path_params['id']}")

@cache("realtime")
async def cart(request: Request) -> PlainTextResponse:
    return PlainTextResponse("cart")

async def boom(request: Request) -> PlainTextResponse:
    return PlainTextResponse("down", status_code=503)

async def plain(request: Request) -> PlainTextResponse:
    return PlainTextResponse("plain")

routes = [Route("/items/{id:int}", item), Route("/cart", cart), Route("/boom", boom), Route("/plain", plain)]
app = Starlette(routes=routes)
app.add_middleware(CacheMiddleware, key_prefix="fleetcli")
'''


def _fleet_config(tmp_path: Path) -> Path:
    config = tmp_path / "cachemw.toml"
    config.write_text('[cachemw]\nkey_prefix = "fleetcli"\n', encoding="utf-8")
    return config


def _fleet_member(module: Any, redis_url: str) -> Any:
    from starlette.applications import Starlette

    from cachemw import CacheMiddleware
    from cachemw.observe import enable_fleet_metrics

    inner = Starlette(routes=module.routes)
    member = CacheMiddleware(inner, redis_url=redis_url, key_prefix="fleetcli")
    member.prepare(inner)
    enable_fleet_metrics(member, interval=0.1)
    return member


@pytest.fixture
def fleet_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    (tmp_path / "fleet_app_for_cli.py").write_text(FLEET_APP, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module("fleet_app_for_cli")


@pytest.mark.anyio
async def test_stats_adds_up_two_processes(shared_url: str, tmp_path: Path, fleet_module: Any) -> None:
    """On one Redis, and on a Redis Cluster, where each report lives on the master of its key's slot."""
    from cachemw.observe import aggregate, read_fleet
    from cachemw.store.redis_clients import redis_clients
    from tests.helpers import eventually

    redis_url = shared_url
    config = _fleet_config(tmp_path)
    first, second = _fleet_member(fleet_module, redis_url), _fleet_member(fleet_module, redis_url)
    clients = redis_clients(redis_url, timeout=5.0)
    direct = clients.client
    try:
        async with lifespan(first), client(first) as a, lifespan(second), client(second) as b:
            assert (await a.get("/items/1")).headers["x-cache"] == "MISS"

            async def filled() -> bool:
                return bool(first.supervisor.counters_for("fill").done == 1)

            await eventually(filled, what="the fill")
            for http in (a, b, b):
                assert (await http.get("/items/1")).headers["x-cache"] == "HIT"
            assert (await b.get("/cart")).headers["x-cache"] == "BYPASS"

            async def reported() -> bool:
                return bool(aggregate(await read_fleet(direct, "fleetcli"))["totals"]["requests"] == 5)

            await eventually(reported, what="both reports")
            result = await anyio.to_thread.run_sync(
                lambda: run("stats", "--config", str(config), "--redis-url", redis_url, "--json"))
            assert result.returncode == 0, result.stderr
            data = json.loads(result.stdout)
            assert len(data["processes"]) == 2
            items = next(r for r in data["routes"] if r["route"] == "/items/{id:int}")
            assert (items["requests"], items["hit"], items["miss"], items["policy"]) == (4, 3, 1, "custom")
            assert items["hit_ratio"] == 0.75
            cart = next(r for r in data["routes"] if r["route"] == "/cart")
            assert (cart["bypass"], cart["policy"]) == (1, "realtime")
            assert data["totals"]["requests"] == 5
            assert data["store"]["breaker"] == {"closed": 2}
            assert data["supervisor"]["kinds"]["fill"]["done"] == 1

            text = await anyio.to_thread.run_sync(
                lambda: run("stats", "--config", str(config), "--redis-url", redis_url))
            assert text.returncode == 0, text.stderr
            [row] = [line for line in text.stdout.splitlines() if line.startswith("/items/{id:int} ")]
            assert row.split()[1:6] == ["custom", "4", "75.0%", "3", "0"]
            assert "processes     2 reporting" in text.stdout
            assert "breaker closed x2" in text.stdout
            assert "fill 0 queued, 0 running, 1 done, 0 failed, 0 shed" in text.stdout
    finally:
        await clients.aclose()


def test_stats_with_no_process_reporting(redis_url: str, tmp_path: Path) -> None:
    config = _fleet_config(tmp_path)
    result = run("stats", "--config", str(config), "--redis-url", redis_url)
    assert result.returncode == 1
    assert_clean_failure(result)
    assert "no process reports its counters" in result.stderr
    assert "'fleetcli'" in result.stderr
    result = run("stats", "--config", str(config), "--redis-url", redis_url, "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["processes"] == []


def test_stats_without_or_with_an_unreachable_redis_is_a_clear_error() -> None:
    result = run("stats")
    assert result.returncode == 2
    assert_clean_failure(result)
    assert "no redis_url configured" in result.stderr
    result = run("stats", "--redis-url", "redis://:secret@127.0.0.1:1/0", "--json")
    assert result.returncode == 2
    assert_clean_failure(result)
    assert len(result.stderr.strip().splitlines()) == 1
    # Which URL (password masked) and why, in one line.
    assert "read stats failed: the redis store at redis://:***@127.0.0.1:1/0 did not answer (" in result.stderr
    assert "Connect call failed" in result.stderr or "refused" in result.stderr.lower()
    assert "secret" not in result.stderr
    assert result.stdout == ""
    result = run("stats", "--redis-url", "redis://127.0.0.1:1/0", "--watch", "0")
    assert result.returncode == 2
    assert "--watch" in result.stderr


def default_sigint() -> None:
    """In a child, before exec: SIGINT as a terminal sends it, even when pytest runs with it ignored
    (nohup, CI runners), which children would otherwise inherit."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(params=["inherited", "ignored"])
def pytest_sigint(request: pytest.FixtureRequest) -> Any:
    """Run the test as pytest runs under a terminal, and as under ``nohup`` / a CI runner (SIGINT ignored)."""
    import signal

    if request.param == "inherited":
        yield request.param
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield request.param
    finally:
        signal.signal(signal.SIGINT, before)


def test_stats_watch_repeats_until_interrupted(redis_url: str, pytest_sigint: str) -> None:
    import signal

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEMW_", "PYTHON"))}
    with subprocess.Popen([str(SCRIPT), "stats", "--redis-url", redis_url, "--watch", "0.1", "--json"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=default_sigint) as watch:
        assert watch.stdout is not None
        views = [json.loads(watch.stdout.readline()) for _ in range(3)]
        watch.send_signal(signal.SIGINT)
        try:
            _, stderr = watch.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            watch.kill()
            raise AssertionError("cachemw stats --watch did not stop on SIGINT") from None
    assert watch.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert all(view["processes"] == [] for view in views)
    assert views[0]["time"] < views[2]["time"]


# -- cachemw warm: fill entries ahead of traffic ---------------------------------------------------


@pytest.fixture
def served_fleet_app(fleet_module: Any, tmp_path: Path, redis_url: str) -> Any:
    """The app under uvicorn in its own process, storing in the private Redis; yields its base URL."""
    import time
    import urllib.request

    from tests.redis_server import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEMW_", "PYTHON"))}
    env["CACHEMW_REDIS_URL"] = redis_url
    with subprocess.Popen([sys.executable, "-m", "uvicorn", "fleet_app_for_cli:app", "--port", str(port),
                           "--log-level", "warning"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) as server:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(base + "/plain", timeout=1):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.05)
        try:
            yield base
        finally:
            server.terminate()
            server.communicate(timeout=30)


def warm(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return run("warm", *args, cwd=cwd)


def test_warm_fills_entries_then_finds_them(served_fleet_app: str, tmp_path: Path, redis_url: str) -> None:
    import time

    urls = [served_fleet_app + path for path in ("/items/1", "/items/2", "/items/3")]
    result = warm(*urls, "--json", "--concurrency", "2")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    data = json.loads(result.stdout)
    assert [r["url"] for r in data["results"]] == urls
    assert [r["x_cache"] for r in data["results"]] == ["MISS"] * 3
    assert all(r["status"] == 200 and r["error"] is None and r["bytes"] > 0 for r in data["results"])
    assert data["summary"] == {"urls": 3, "failed": 0, "x_cache": {"MISS": 3}}
    with redis.Redis.from_url(redis_url) as direct:
        deadline = time.monotonic() + 10
        while len(direct.keys("fleetcli:e:*")) < 3:  # stored after the responses went out
            assert time.monotonic() < deadline, direct.keys("*")
            time.sleep(0.02)

    again = warm(*urls, "--app", "fleet_app_for_cli:app", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert all(line.startswith("HIT     200") for line in lines[:3]), lines
    assert lines[-1] == "warmed 3 of 3 URLs (3 HIT)"


def test_warm_reports_uncached_and_failing_urls(served_fleet_app: str, tmp_path: Path) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text(f"# warm these\n{served_fleet_app}/items/7\n\n{served_fleet_app}/plain\n"
                       f"{served_fleet_app}/boom\n{served_fleet_app}/cart\n", encoding="utf-8")
    result = warm("--from-file", str(listing), "--app", "fleet_app_for_cli:app", "--json", cwd=tmp_path)
    assert result.returncode == 1  # one URL failed
    data = json.loads(result.stdout)
    by_path = {r["url"].rsplit("/", 1)[-1]: r for r in data["results"]}
    assert (by_path["7"]["x_cache"], by_path["7"]["route"], by_path["7"]["policy"]) == ("MISS", "/items/{id:int}",
                                                                                      "custom")
    assert (by_path["plain"]["x_cache"], by_path["plain"]["route"]) == (None, None)
    assert (by_path["boom"]["status"], by_path["boom"]["error"]) == (503, "HTTP 503")
    assert (by_path["cart"]["x_cache"], by_path["cart"]["route"]) == ("BYPASS", None)
    assert data["summary"]["failed"] == 1
    text = warm("--from-file", str(listing), "--app", "fleet_app_for_cli:app", cwd=tmp_path)
    assert "no cache policy: nothing to warm" in text.stdout
    assert "(HTTP 503)" in text.stdout
    assert text.stdout.rstrip().endswith("; 1 failed")


def test_warm_reads_urls_from_stdin(served_fleet_app: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEMW_", "PYTHON"))}
    result = subprocess.run([str(SCRIPT), "warm", "--from-file", "-", "--json"], input=served_fleet_app + "/items/9\n",
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["x_cache"] == "MISS"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("http://127.0.0.1:1/items/1",), "could not reach 127.0.0.1:1"),
        (("/items/1",), "not an absolute http(s) URL"),
        ((), "no URL to warm"),
        (("http://127.0.0.1:1/", "--concurrency", "0"), "--concurrency 0"),
        (("http://127.0.0.1:1/", "-H", "nocolon"), "expected a header as 'Name: value'"),
        (("--from-file", "/nonexistent/urls.txt"), "--from-file /nonexistent/urls.txt"),
    ],
    ids=["unreachable", "relative", "none", "concurrency", "header", "file"],
)
def test_warm_usage_and_connection_errors(args: tuple[str, ...], message: str) -> None:
    result = warm(*args)
    assert result.returncode == 2
    assert_clean_failure(result)
    assert message in result.stderr
    assert result.stdout == ""


def test_warm_shows_progress_on_a_terminal(served_fleet_app: str) -> None:
    import contextlib
    import pty

    urls = [f"{served_fleet_app}/items/{n}" for n in range(20, 25)]
    controller, terminal = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEMW_", "PYTHON"))}
    with subprocess.Popen([str(SCRIPT), "warm", *urls], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=terminal, text=True) as warming:
        os.close(terminal)
        stdout, _ = warming.communicate(timeout=60)
    shown = b""
    with contextlib.suppress(OSError):  # EIO once the terminal's other side is closed
        while chunk := os.read(controller, 4096):
            shown += chunk
    os.close(controller)
    assert warming.returncode == 0
    assert b"] 1/5 " in shown and b"[##############################] 5/5 " in shown
    assert shown.endswith(b"\r\x1b[K")  # the bar is wiped before the report
    assert stdout.splitlines()[-1] == "warmed 5 of 5 URLs (5 MISS)"


KEYED_APP = '''
from fastapi import Depends, FastAPI
from fastapi.security import APIKeyHeader

from cachemw import CacheMiddleware, cache

app = FastAPI()
api_key = APIKeyHeader(name="X-API-Key", auto_error=False)


@app.get("/offers")
@cache(ttl="5m")
async def offers(key: str | None = Depends(api_key)) -> dict[str, str]:
    return {"offers": key or "everyone"}


app.add_middleware(CacheMiddleware)
'''


def test_inspect_refuses_a_routes_security_scheme_credential_as_the_middleware_does(
        redis_url: str, tmp_path: Path) -> None:
    (tmp_path / "keyed_app.py").write_text(KEYED_APP, encoding="utf-8")
    url = BASE + "/offers"
    keyed = run("inspect", url, "--app", "keyed_app:app", "--redis-url", redis_url, "-H", "X-API-Key: k",
                cwd=tmp_path)
    assert keyed.returncode == 1 and "carries credentials" in keyed.stderr, keyed.stderr
    anonymous = run("inspect", url, "--app", "keyed_app:app", "--redis-url", redis_url, "--json", cwd=tmp_path)
    assert anonymous.returncode == 0, anonymous.stderr
    assert json.loads(anonymous.stdout)["state"] == "absent"
