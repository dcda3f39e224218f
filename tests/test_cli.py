"""The ``cachemw`` command, run as an operator runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "cachemw"
SAMPLE_CONFIG = REPO / "sample_app" / "cachemw.toml"


def run(*args: str, cwd: Path = REPO, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEMW_", "PYTHON"))}
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
    assert "routes" in result.stdout
    assert "check" in result.stdout
    for command in ("routes", "check"):
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
    # A dotted module path; the installed package, not the working directory, provides it.
    result = run("routes", "sample_app.app:app", cwd=tmp_path)
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
    assert result.returncode != 0
    assert_clean_failure(result)
    assert message in result.stderr
    assert result.stdout == ""


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
        ('[[cachemw.rules]]\nroute = "/stats"\n[[cachemw.rules]]\nroute = "/x"\npolicy = "weekly"\n',
         "policy", "weekly"),
        ('[[cachemw.rules]]\nroute = "/stats"\n[[cachemw.rules]]\nroute = "/x"\nttl = "5m"\nttll = "5m"\n',
         "ttll", "ttll"),
        ('[[cachemw.rules]]\nroute = "/stats"\n[[cachemw.rules]]\nroute = "/x"\nvary = ["bad header"]\n',
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


def test_check_with_a_bad_app_path_is_a_clear_error() -> None:
    result = run("check", str(SAMPLE_CONFIG), "--app", "nosuchmodule:app")
    assert result.returncode != 0
    assert_clean_failure(result)
    assert "cannot import 'nosuchmodule'" in result.stderr
