"""Every Prometheus family a real app exposes follows the naming guide and is the one docs/reference/metrics.md lists.

https://prometheus.io/docs/practices/naming/: counters end in ``_total``, durations in
``_seconds``, sizes in ``_bytes``, shares in ``_ratio``; a gauge of a count carries no unit;
labels have few values (route templates, never the requested paths). The documented unit of
each family is what the name is checked against, so the reference and the exposition agree.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, WriteBehind, cache
from cachemw.observe import find_cache, metrics_app, snapshot
from tests.helpers import client, eventually, lifespan

pytestmark = pytest.mark.anyio

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "metrics.md"
UNITS = {"seconds": "_seconds", "bytes": "_bytes", "ratio": "_ratio"}
# Suffixes that name a unit (the guide's base units, and the non-base ones it warns against).
UNIT_SUFFIXES = ("_seconds", "_bytes", "_ratio", "_milliseconds", "_ms", "_microseconds", "_minutes", "_hours",
                 "_kilobytes", "_megabytes", "_percent", "_celsius", "_meters", "_volts", "_amperes", "_joules",
                 "_grams")
HISTOGRAM_SAMPLES = ("_bucket", "_count", "_sum", "_created")


@dataclass(frozen=True)
class Documented:
    type: str
    unit: str
    labels: frozenset[str]


def documented() -> dict[str, Documented]:
    """The Prometheus table of the reference: name, type, unit, labels."""
    text = REFERENCE.read_text(encoding="utf-8")
    section = text.split("\n## Prometheus\n", 1)[1].split("\n## ", 1)[0]
    found: dict[str, Documented] = {}
    for line in section.splitlines():
        if not line.startswith("| `cachemw_"):
            continue
        name, kind, unit, labels = (cell.strip() for cell in line.strip("|").split("|")[:4])
        found[name.strip("`")] = Documented(kind, unit, frozenset(label.strip(" `") for label in labels.split(",")
                                                                  if label.strip()))
    return found


@cache(ttl="5m", tags=["product:{id}"])
async def product(request: Request) -> Response:
    return PlainTextResponse(f"product {request.path_params['id']}")


@cache(ttl="5m", sync="30s")
async def catalog(request: Request) -> Response:
    return PlainTextResponse(f"catalog {request.path_params['section']}")


@cache("realtime")
async def cart(request: Request) -> Response:
    return PlainTextResponse("cart")


def make_app(redis_url: str, queue: WriteBehind[Any]) -> Starlette:
    app = Starlette(routes=[Route("/products/{id:int}", product), Route("/catalog/{section}", catalog),
                            Route("/cart", cart), Route("/metrics", metrics_app())])
    app.add_middleware(CacheMiddleware, redis_url=redis_url, key_prefix=f"names{secrets.token_hex(4)}",
                       write_behind=[queue])
    return app


def exposed_name(family: Any) -> str:
    """The name the exposition writes: a counter's family name is parsed without its ``_total``."""
    if family.type == "counter" and not family.name.endswith("_total"):
        return str(family.name) + "_total"
    return str(family.name)


async def test_every_family_of_a_real_scrape_follows_the_naming_guide(redis_url: str) -> None:
    queue: WriteBehind[Any] = WriteBehind("cart")  # no flush function: its writes wait, and show a backlog
    app = make_app(redis_url, queue)
    paths = ["/products/1", "/products/2", "/catalog/shoes", "/catalog/hats", "/cart"]
    async with lifespan(app), client(app) as http:
        for path in paths:
            assert (await http.get(path)).headers["x-cache"] in ("MISS", "BYPASS")
        cache_ = find_cache(app)

        async def stored() -> bool:
            return cache_.supervisor.counters_for("fill").done >= 4

        await eventually(stored, what="the four fills")
        for path in paths:
            await http.get(path)
        await queue.put("user:1", {"items": 1})
        response = await http.get("/metrics")
        templates = {row["route"] for row in snapshot(cache_)["routes"] if row["policy"] is not None}
    assert response.status_code == 200
    raw_paths = set(paths) - templates  # "/cart" is its own template
    reference = documented()
    assert len(reference) > 30, "the reference's Prometheus table was not found"
    families = list(text_string_to_metric_families(response.text))
    seen: set[str] = set()
    for family in families:
        name = exposed_name(family)
        seen.add(name)
        doc = reference.get(name)
        assert doc is not None, f"{name} is exposed but not in {REFERENCE.name}"
        assert family.type == doc.type, (name, family.type, doc.type)
        base = name.removesuffix("_total")
        if family.type == "counter":
            assert name.endswith("_total"), name
            assert all(s.name == name or s.name == base + "_created" for s in family.samples), name
        else:
            assert not name.endswith("_total"), f"{name}: only counters end in _total"
        if family.type == "histogram":
            assert doc.unit in ("seconds", "bytes"), f"{name}: a histogram of durations or sizes"
            assert all(s.name.removeprefix(name) in HISTOGRAM_SAMPLES for s in family.samples), name
        if doc.unit:
            assert base.endswith(UNITS[doc.unit]), f"{name}: in {doc.unit}, so its name ends {UNITS[doc.unit]}"
        else:
            assert not base.endswith(UNIT_SUFFIXES), f"{name}: a count or a state carries no unit suffix"
        assert ":" not in name and name.startswith("cachemw_"), name
        for sample in family.samples:
            labels = set(sample.labels) - ({"le"} if family.type == "histogram" else set())
            assert labels <= doc.labels, (name, labels, doc.labels)
            route = sample.labels.get("route")
            if route is not None:
                assert route in templates, f"{name}: route={route!r} is not a route template"
            assert not set(sample.labels.values()) & raw_paths, f"{name}: a requested path as a label value"
    assert seen == set(reference), f"documented but not exposed: {set(reference) - seen}"
    # A raw path never became a route label: each template stands for all its paths.
    requests = {s.labels["route"] for f in families if f.name == "cachemw_requests" for s in f.samples}
    assert requests == {"/products/{id:int}", "/catalog/{section}", "/cart"}

