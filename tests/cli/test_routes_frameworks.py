"""``cachemw routes`` for Django projects and Flask apps: the installed console script, in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_cli import REPO, assert_clean_failure, run

DJANGO = "tests.apps.djangoproject.settings"
DJANGO_CONFIG = Path(__file__).resolve().parents[1] / "apps" / "djangoproject" / "cachemw.toml"
DJANGO_ROWS = [
    ["/api/items/{pk}/", "*", "minutes:", "ttl=2m", "swr=10m", "sie=1h", "tags=item:{pk}", "decorator"],
    ["/api/articles/{slug}/", "*", "ttl=5m", "decorator"],
    ["/shops/{shop}/items/{pk}/", "*", "minutes:", "ttl=2m", "swr=10m", "sie=1h", "tags=item:{pk}", "decorator"],
    ["/plain/", "*", "-", "default"],
    ["/archive/{year}/", "*", "hours:", "ttl=1h", "swr=6h", "sie=1d", f"{DJANGO_CONFIG}", "rule", "1"],
    ["/calls/", "*", "-", "default"],
    ["/ready", "*", "-", "default"],
    ["/slow/{n}/", "*", "ttl=5m", "decorator"],
    ["/me/", "*", "ttl=5m", "private", "decorator"],
    ["/feed/", "*", "ttl=5m", "decorator"],
    ["/change/{pk}/", "*", "-", "default"],
]


def rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line.startswith("/")]


def test_routes_of_a_django_project_from_its_settings_module() -> None:
    result = run("routes", "--django", DJANGO)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines()[0].split() == ["ROUTE", "METHODS", "POLICY", "SOURCE"]
    assert rows(result.stdout) == DJANGO_ROWS
    # The config comes from settings.CACHEMW, as it does for cachemw.django.asgi_application().
    assert f"config: {DJANGO_CONFIG}; store: memory" in result.stdout


def test_routes_of_a_django_projects_asgi_application_are_the_same() -> None:
    result = run("routes", "tests.apps.djangoproject.asgi:application")
    assert result.returncode == 0, result.stderr
    assert rows(result.stdout) == DJANGO_ROWS


def test_routes_of_a_django_project_as_json_name_its_views() -> None:
    result = run("routes", "--django", DJANGO, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [(route["route"], route["name"]) for route in data["routes"][:3]] == [
        ("/api/items/{pk}/", "api:item"), ("/api/articles/{slug}/", "api:article"),
        ("/shops/{shop}/items/{pk}/", "shop-item")]
    assert data["routes"][0]["methods"] == []  # every method: Django's views dispatch on it themselves
    assert data["config"] == str(DJANGO_CONFIG)


def test_routes_of_a_django_project_with_another_config(tmp_path: Path) -> None:
    config = tmp_path / "cachemw.toml"
    config.write_text('[cachemw]\n[[cachemw.rules]]\nroute = "/plain/"\npolicy = "days"\n', encoding="utf-8")
    result = run("routes", "--django", DJANGO, "--config", str(config))
    assert result.returncode == 0, result.stderr
    by_route = {row[0]: row for row in rows(result.stdout)}
    assert by_route["/plain/"][2] == "days:" and by_route["/plain/"][-3:] == [str(config), "rule", "1"]
    assert by_route["/archive/{year}/"][-1] == "default"


def test_a_rule_naming_no_django_route_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "cachemw.toml"
    config.write_text('[cachemw]\n[[cachemw.rules]]\nroute = "/plain"\npolicy = "days"\n', encoding="utf-8")
    result = run("routes", "--django", DJANGO, "--config", str(config))
    assert result.returncode == 2
    assert_clean_failure(result)
    assert "rule 1 (route '/plain')" in result.stderr and "its routes are: /api/items/{pk}/, " in result.stderr


@pytest.mark.parametrize(("arguments", "message"), [
    (["--django", "nosuch.settings"], "cannot set up Django with settings 'nosuch.settings': No module named"),
    ([], "name an app (MODULE:ATTRIBUTE) or a Django project (--django SETTINGS), one of them"),
    (["sample_app:app", "--django", DJANGO], "one of them"),
])
def test_routes_without_one_app_or_project_is_a_clear_error(arguments: list[str], message: str) -> None:
    result = run("routes", *arguments)
    assert result.returncode == 2
    assert_clean_failure(result)
    assert message in result.stderr


FLASK_APP = """
from flask import Flask
from flask.views import MethodView

from cachemw import cache
from cachemw.wsgi import CacheMiddleware


def make(name):
    app = Flask(name)

    @app.get("/items/<int:item_id>")
    @cache(ttl="5m", tags=["item:{item_id}"])
    def item(item_id):
        return "item"

    @cache("minutes")
    class Stats(MethodView):
        def get(self):
            return "stats"

    app.add_url_rule("/stats", view_func=Stats.as_view("stats"))
    app.add_url_rule("/plain", view_func=lambda: "plain", endpoint="plain")
    return app


app = make("plain_flask")
wrapped = make("wrapped_flask")
wrapped.wsgi_app = CacheMiddleware(wrapped.wsgi_app)
middleware = wrapped.wsgi_app
"""
FLASK_ROWS = [
    ["/static/{filename}", "GET,OPTIONS", "-", "default"],
    ["/items/{item_id}", "GET,OPTIONS", "ttl=5m", "tags=item:{item_id}", "decorator"],
    ["/stats", "GET,OPTIONS", "minutes:", "ttl=2m", "swr=10m", "sie=1h", "decorator"],
    ["/plain", "GET,OPTIONS", "-", "default"],
]


@pytest.mark.parametrize("target", ["myflask:app", "myflask:app.wsgi_app", "myflask:wrapped", "myflask:middleware"])
def test_routes_of_a_flask_app_its_wsgi_app_or_the_cache_around_it(tmp_path: Path, target: str) -> None:
    (tmp_path / "myflask.py").write_text(FLASK_APP, encoding="utf-8")
    result = run("routes", target, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert rows(result.stdout) == FLASK_ROWS
    assert "config: (none: defaults); store: memory" in result.stdout


def test_a_file_rule_names_a_flask_route(tmp_path: Path) -> None:
    (tmp_path / "myflask.py").write_text(FLASK_APP, encoding="utf-8")
    config = tmp_path / "cachemw.toml"
    config.write_text('[cachemw]\n[[cachemw.rules]]\nroute = "/plain"\npolicy = "hours"\n', encoding="utf-8")
    result = run("routes", "myflask:wrapped", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [plain] = [row for row in rows(result.stdout) if row[0] == "/plain"]
    assert plain[2] == "hours:" and plain[-3:] == [str(config), "rule", "1"]


def test_check_finds_a_rule_naming_no_flask_route(tmp_path: Path) -> None:
    (tmp_path / "myflask.py").write_text(FLASK_APP, encoding="utf-8")
    config = tmp_path / "cachemw.toml"
    config.write_text('[cachemw]\n[[cachemw.rules]]\nroute = "/plain/"\npolicy = "hours"\n', encoding="utf-8")
    result = run("check", str(config), "--app", "myflask:wrapped", cwd=tmp_path)
    assert result.returncode == 2
    assert_clean_failure(result)
    assert "rule 1 (route '/plain/')" in result.stderr and "/items/{item_id}" in result.stderr


# -- the store in the footer: the one the middleware will use, password masked ---------------------


def _with_password(redis_url: str) -> str:
    return redis_url.replace("redis://", "redis://:s3cret@", 1)


def _masked(redis_url: str) -> str:
    return redis_url.replace("redis://", "redis://:***@", 1)


FLASK_ON_REDIS = """
from flask import Flask

from cachemw import cache
from cachemw.wsgi import CacheMiddleware

app = Flask(__name__)
app.wsgi_app = CacheMiddleware(app.wsgi_app, redis_url={url!r})


@app.get("/products/<int:id>")
@cache("minutes", tags=["product:{{id}}"])
def product(id):
    return {{"id": id}}
"""


def _footer_and_json(*arguments: str, cwd: Path, extra_env: dict[str, str] | None = None) -> tuple[str, str]:
    text = run("routes", *arguments, cwd=cwd, extra_env=extra_env)
    assert text.returncode == 0, text.stderr
    as_json = run("routes", *arguments, "--json", cwd=cwd, extra_env=extra_env)
    assert as_json.returncode == 0, as_json.stderr
    assert "s3cret" not in text.stdout + as_json.stdout
    [footer] = [line for line in text.stdout.splitlines() if line.startswith("config: ")]
    store: str = json.loads(as_json.stdout)["store"]
    return footer, store


@pytest.mark.parametrize("target", ["myflask:app", "myflask:app.wsgi_app"])
def test_routes_names_the_redis_a_flask_apps_middleware_was_given(tmp_path: Path, redis_url: str,
                                                                  target: str) -> None:
    (tmp_path / "myflask.py").write_text(FLASK_ON_REDIS.format(url=_with_password(redis_url)), encoding="utf-8")
    footer, store = _footer_and_json(target, cwd=tmp_path)
    assert footer == f"config: (none: defaults); store: {_masked(redis_url)}"
    assert store == _masked(redis_url)


def test_routes_names_a_store_object_the_middleware_was_given(tmp_path: Path) -> None:
    source = FLASK_APP.replace("CacheMiddleware(wrapped.wsgi_app)",
                               "CacheMiddleware(wrapped.wsgi_app, store=MemoryStore())")
    (tmp_path / "myflask.py").write_text(source.replace("from cachemw import cache",
                                                        "from cachemw import MemoryStore, cache"), encoding="utf-8")
    footer, store = _footer_and_json("myflask:wrapped", cwd=tmp_path)
    assert footer == "config: (none: defaults); store: MemoryStore (given as store=)"
    assert store == "MemoryStore (given as store=)"


DJANGO_SETTINGS_ON_REDIS = """
from tests.apps.djangoproject.settings import *  # noqa: F403

CACHEMW = {{**CACHEMW, "redis_url": {url!r}}}  # noqa: F405
"""
DJANGO_WSGI_ON_REDIS = """
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.apps.djangoproject.settings")

from django.core.wsgi import get_wsgi_application

from cachemw.django import wsgi_application

application = wsgi_application(get_wsgi_application(), redis_url={url!r})
"""


def test_routes_names_the_redis_of_settings_cachemw(tmp_path: Path, redis_url: str) -> None:
    (tmp_path / "onredis.py").write_text(DJANGO_SETTINGS_ON_REDIS.format(url=_with_password(redis_url)),
                                         encoding="utf-8")
    footer, store = _footer_and_json("--django", "onredis", cwd=tmp_path, extra_env={"PYTHONPATH": str(REPO)})
    assert footer == f"config: {DJANGO_CONFIG}; store: {_masked(redis_url)}" and store == _masked(redis_url)


def test_routes_names_the_redis_a_django_wsgi_application_was_given(tmp_path: Path, redis_url: str) -> None:
    (tmp_path / "mysite_wsgi.py").write_text(DJANGO_WSGI_ON_REDIS.format(url=_with_password(redis_url)),
                                             encoding="utf-8")
    footer, store = _footer_and_json("mysite_wsgi:application", cwd=tmp_path, extra_env={"PYTHONPATH": str(REPO)})
    assert footer == f"config: {DJANGO_CONFIG}; store: {_masked(redis_url)}" and store == _masked(redis_url)
