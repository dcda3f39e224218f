"""What every shell (the ASGI middleware, the WSGI middleware) shows of its cache to handlers, tools and observers.

``observe/`` and ``cli/`` read a shell through this base class only: its runtime
and what the operator sees of it, never a shell's own internals. Before the shell
has started (its first request or lifespan), there is no runtime yet: the
properties then show an empty cache.
"""

from __future__ import annotations

import abc
from typing import Any

from cachemw.core.breaker import CircuitBreaker
from cachemw.core.metrics import Metrics
from cachemw.core.rules import RuleTable
from cachemw.core.settings import Settings
from cachemw.runtime.accesslog import AccessLog
from cachemw.runtime.invalidation import Invalidator
from cachemw.runtime.looplag import LoopLag
from cachemw.runtime.runtime import CacheRuntime
from cachemw.runtime.supervisor import Supervisor
from cachemw.store.base import Store
from cachemw.store.l1 import L1

__all__ = ["CacheShell"]

_NO_BREAKER = CircuitBreaker()  # what `breaker` shows before startup: closed, never used
_NO_L1 = L1()  # what `l1` shows before startup: empty (nothing is put in it)


class CacheShell(abc.ABC):
    """A cache in front of an app: built lazily, then one runtime until the app shuts down."""

    runtime: CacheRuntime | None
    metrics: Metrics
    access_log: AccessLog
    loop_lag: LoopLag

    @abc.abstractmethod
    def prepare(self, routes_owner: Any) -> RuleTable:
        """Build the rule table and the runtime once (``routes_owner``: what holds the app's routes)."""

    def start(self) -> None:  # noqa: B027 - a no-op by default, not abstract
        """Start the cache now, where the shell owns its loop (the WSGI shell); the ASGI shell starts with the
        app's lifespan. For code that purges before any request came (a worker, a script)."""

    @property
    @abc.abstractmethod
    def supervisor(self) -> Supervisor:
        """The background work's supervisor (final once prepared)."""

    @property
    @abc.abstractmethod
    def store(self) -> Store | None:
        """The store (the one given, before startup)."""

    @property
    def settings(self) -> Settings | None:
        return None if self.runtime is None else self.runtime.settings

    @property
    def table(self) -> RuleTable | None:
        return None if self.runtime is None else self.runtime.table

    @property
    def l1(self) -> L1:
        return _NO_L1 if self.runtime is None else self.runtime.l1

    @property
    def invalidator(self) -> Invalidator | None:
        return None if self.runtime is None else self.runtime.invalidator

    @property
    def store_problem(self) -> str | None:
        return None if self.runtime is None else self.runtime.store_problem

    @property
    def breaker(self) -> CircuitBreaker:
        """The store's breaker (on a cluster, the one for keys no node could be found for)."""
        return _NO_BREAKER if self.runtime is None else self.runtime.breaker

    @property
    def node_breakers(self) -> dict[str, CircuitBreaker]:
        return {} if self.runtime is None else self.runtime.node_breakers

    @property
    def store_errors(self) -> int:
        return 0 if self.runtime is None else self.runtime.store_errors

    @property
    def loop_lag_timeouts(self) -> int:
        """Store timeouts that were this process's lateness, not the store's."""
        return 0 if self.runtime is None else self.runtime.loop_lag_timeouts

    @property
    def late_replies(self) -> int:
        """Store replies after the budget that were used: this process's loop ran late, the store answered."""
        return 0 if self.runtime is None else self.runtime.late_replies
