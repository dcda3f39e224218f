"""What a fill of one key carries from its start to its store: its tags and the generations seen at its start."""

from __future__ import annotations

from dataclasses import dataclass

from cachemw.core.keys import path_tag, route_tag
from cachemw.core.keyspace import ALL_TAG, tag_keys
from cachemw.core.policy import Policy
from cachemw.core.rules import RouteMatch, normalise_template
from cachemw.runtime.invalidation import format_tags
from cachemw.store.base import FillWaiter, LockResult

__all__ = ["FILL_PLAN_BYTES", "FillPlan", "Planner"]

# What a queued fill holds besides its entry: the plan, its tag and generation key strings, the route
# match. Measured with tracemalloc on CPython 3.11 (bench/memory.py's /item/{id} route): about 930 B.
FILL_PLAN_BYTES = 1024


@dataclass(slots=True)
class FillPlan:
    """One key's fill: stored only if no generation it read moved meanwhile (an invalidation ran)."""

    key: str
    policy: Policy
    match: RouteMatch
    tags: tuple[str, ...]
    generation_keys: tuple[str, ...]
    generations: tuple[int, ...] | None = None  # unknown: the fill is served but never stored
    token: str | None = None
    # A lookup that found nothing and tried the lock in the same round trip: its result,
    # and the waiter registered before it (so a fill announced meanwhile is not missed).
    looked_up: LockResult | None = None
    waiter: FillWaiter | None = None
    filling: bool = False  # the lock went to a fill job, which releases it


class Planner:
    """Makes plans; per route template, once, its route tag and the generation keys that never change."""

    __slots__ = ("_prefix", "_route_tags")

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._route_tags: dict[str, tuple[str, str, str]] = {}

    def plan(self, key: str, policy: Policy, match: RouteMatch, path: str) -> FillPlan:
        """A miss adds only its path's tag (and the rule's own tags) to what its route has anyway."""
        prefix = self._prefix
        template = match.rule.template
        fixed = self._route_tags.get(template)
        if fixed is None:
            route = route_tag(normalise_template(template))
            fixed = self._route_tags[template] = (route, tag_keys(prefix, route)[1], tag_keys(prefix, ALL_TAG)[1])
        route, route_generation, all_generation = fixed
        path_name = path_tag(path)
        path_generation = tag_keys(prefix, path_name)[1]
        if not policy.tags:
            return FillPlan(key, policy, match, (route, path_name), (route_generation, path_generation, all_generation))
        own = format_tags(policy.tags, match.path_params)
        return FillPlan(key, policy, match, (*own, route, path_name),
                        (*(tag_keys(prefix, tag)[1] for tag in own), route_generation, path_generation,
                         all_generation))
