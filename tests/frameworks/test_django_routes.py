"""Django's URLconf as a rule table: the routes it lists, and a matcher that is Django's own resolver."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import override_settings  # type: ignore[import-untyped]
from django.urls import Resolver404, resolve  # type: ignore[import-untyped]

from cachemw.core.policy import PRESETS, ConfigError
from cachemw.core.rules import RouteRule, RuleTable
from cachemw.core.settings import Settings, load_settings
from cachemw.frameworks.django import regex_template, route_table

EDGE = "tests.apps.djangoproject.edge_urls"


def settings_from(directory: Path, rules: str) -> Settings:
    path = directory / "cachemw.toml"
    path.write_text("[cachemw]\n" + rules, encoding="utf-8")
    return load_settings(path, environ={})


def rule_for(table: RuleTable, template: str) -> RouteRule:
    [rule] = [rule for rule in table.rules if rule.template == template]
    return rule


def test_the_table_lists_every_view_with_its_template_name_and_policy() -> None:
    table = route_table(Settings())
    listed = [(rule.template, rule.name, rule.source) for rule in table.rules]
    assert listed == [
        ("/api/items/{pk}/", "api:item", "decorator"),
        ("/api/articles/{slug}/", "api:article", "decorator"),
        ("/shops/{shop}/items/{pk}/", "shop-item", "decorator"),
        ("/plain/", "plain", "default"),
        ("/archive/{year}/", "archive", "default"),
        ("/calls/", "calls", "default"),
        ("/ready", "tests.apps.djangoproject.views.ready", "default"),
    ]
    assert all(rule.methods is None for rule in table.rules)  # Django's views dispatch on the method themselves
    assert table.warnings == ()


def test_cache_on_a_function_view_and_on_a_class_based_view() -> None:
    table = route_table(Settings())
    item = rule_for(table, "/api/items/{pk}/").policy
    assert item is not None
    assert (item.preset, item.ttl, item.tags) == ("minutes", PRESETS["minutes"].ttl, ("item:{pk}",))
    article = rule_for(table, "/api/articles/{slug}/").policy
    assert article is not None and article.ttl == 300.0
    assert rule_for(table, "/plain/").policy is None
    assert rule_for(table, "/api/items/{pk}/").label == "/api/items/<pk>/"  # braces would be Cluster hash tags


@pytest.mark.parametrize(("path", "template"), [
    ("/api/items/3/", "/api/items/{pk}/"),
    ("/api/items/x/", None),  # the int converter refuses it: Django answers 404
    ("/api/items/3", None),  # APPEND_SLASH redirects it: no view runs for it
    ("/api/articles/hello-world/", "/api/articles/{slug}/"),
    ("/api/articles/hé/", None),  # paths come percent-decoded, as Django reads them
    ("/shops/north-1/items/7/", "/shops/{shop}/items/{pk}/"),
    ("/shops/north 1/items/7/", None),
    ("/archive/2024/", "/archive/{year}/"),
    ("/archive/24/", None),
    ("/archive/2024/extra/", None),
    ("/plain/", "/plain/"),
    ("/ready", "/ready"),
    ("/ready/", None),
    ("/", None),
    ("", None),
    ("/api/", None),
])
def test_matching_is_djangos_resolve(path: str, template: str | None) -> None:
    table = route_table(Settings())
    rule = table.route_for(path, "GET")
    assert getattr(rule, "template", None) == template
    try:
        match = resolve(path)
    except Resolver404:
        assert rule is None
        return
    assert isinstance(rule, RouteRule) and rule.name == match.view_name
    if rule.policy is not None:
        found = table.match(path, "GET")
        assert found is not None and found.path_params == {key: str(value) for key, value in match.kwargs.items()}


def test_path_params_are_djangos_converted_kwargs() -> None:
    found = route_table(Settings()).match("/shops/north-1/items/007/", "GET")
    assert found is not None and found.path_params == {"shop": "north-1", "pk": "7"}


@pytest.mark.parametrize(("path", "root_path", "template"), [
    ("/mount/api/items/1/", "/mount", "/api/items/{pk}/"),
    ("/api/items/1/", "/mount", "/api/items/{pk}/"),  # not under root_path: Django resolves the path as it is
    ("/mount/api/items/1/", "", None),
    ("/mount", "/mount", None),  # an empty path_info resolves to nothing in Django's ASGI handler
])
def test_the_root_path_comes_off_as_djangos_asgi_handler_takes_it_off(path: str, root_path: str,
                                                                        template: str | None) -> None:
    found = route_table(Settings()).match_scope({"path": path, "root_path": root_path, "method": "GET"})
    assert (found and found.rule.template) == template


def test_force_script_name_comes_off_instead_of_root_path() -> None:
    with override_settings(FORCE_SCRIPT_NAME="/forced"):
        table = route_table(Settings())
    found = table.match_scope({"path": "/forced/api/items/1/", "root_path": "/mount", "method": "GET"})
    assert found is not None and found.rule.template == "/api/items/{pk}/"
    assert table.match_scope({"path": "/mount/api/items/1/", "root_path": "/mount", "method": "GET"}) is None


@pytest.mark.parametrize(("path", "root_path", "template"), [
    ("/mount/api/items/1/", "/mount", "/api/items/{pk}/"),
    ("/mount/plain/", "/mount", "/plain/"),
    ("/forced/plain/", "", None),  # FORCE_SCRIPT_NAME is not taken off PATH_INFO
])
def test_through_the_wsgi_handler_path_info_is_resolved(path: str, root_path: str, template: str | None) -> None:
    with override_settings(FORCE_SCRIPT_NAME="/forced"):  # the WSGI handler's script name; PATH_INFO stays
        table = route_table(Settings(), wsgi=True)
    assert getattr(table.route_for(path, "GET", root_path), "template", None) == template


def test_head_is_answered_from_get_unless_the_view_has_its_own_head() -> None:
    assert route_table(Settings()).match("/api/articles/a/", "HEAD") is not None
    edge = route_table(Settings(), EDGE)
    assert edge.match("/headed/", "GET") is not None
    assert edge.match("/headed/", "HEAD") is None


def test_the_pattern_django_resolves_is_the_one_matched() -> None:
    table = route_table(Settings(), EDGE)
    assert resolve("/same/", EDGE).url_name == "first"
    found = table.match("/same/", "GET")
    assert found is not None and found.rule.name == "first"
    assert rule_for(table, "/pages/(\\d+)/").policy is not None  # an unnamed group stays as written
    pages = table.match("/pages/12/", "GET")
    assert pages is not None and pages.path_params == {}


def test_cache_on_the_function_as_view_returns() -> None:
    rule = rule_for(route_table(Settings(), EDGE), "/cached-fn/")
    assert rule.policy is not None and rule.policy.ttl == 60.0


def test_a_route_under_i18n_patterns_is_listed_but_not_cached() -> None:
    table = route_table(Settings(), EDGE)
    rule = rule_for(table, "/en-us/about/")
    assert rule.policy is None
    assert table.route_for("/en-us/about/", "GET") is rule
    assert table.match("/en-us/about/", "GET") is None
    assert any("'/en-us/about/'" in warning and "i18n_patterns" in warning for warning in table.warnings)


@pytest.mark.parametrize(("regex", "template"), [
    (r"^archive/(?P<year>[0-9]{4})/$", "archive/{year}/"),
    (r"^a/(?P<x>(a|b)[)\]]+)/(?P<y>\d+)\.json\Z", "a/{x}/{y}.json"),
    (r"^(?P<s>[^]/]+)/x$", "{s}/x"),
    (r"^page/(\d+)/$", r"page/(\d+)/"),
    (r"^api/", "api/"),
    (r"^price\$$", "price$"),
])
def test_a_re_path_reads_as_a_template(regex: str, template: str) -> None:
    assert regex_template(regex) == template


# -- file rules ---------------------------------------------------------------------------------


def test_file_rules_name_django_templates_and_the_decorator_wins(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, '[[cachemw.rules]]\nroute = "/archive/{year}/"\npolicy = "hours"\n\n'
                                       '[[cachemw.rules]]\nroute = "/api/*"\npolicy = "realtime"\n')
    table = route_table(settings)
    archive = rule_for(table, "/archive/{year}/")
    assert archive.policy is not None and archive.policy.preset == "hours"
    assert archive.source == f"{tmp_path / 'cachemw.toml'} rule 1"
    assert rule_for(table, "/api/items/{pk}/").source == "decorator"
    found = table.match("/archive/1999/", "GET")
    assert found is not None and found.path_params == {"year": "1999"}


def test_a_file_rule_matching_no_django_route_fails_naming_the_routes(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, '[[cachemw.rules]]\nroute = "/archive/{y}"\npolicy = "hours"\n')
    with pytest.raises(ConfigError) as failure:
        route_table(settings)
    message = str(failure.value)
    assert f"{tmp_path / 'cachemw.toml'}: rule 1 (route '/archive/{{y}}')" in message
    assert "matches no route of the app" in message
    assert "/archive/{year}/" in message and "/api/items/{pk}/" in message
