"""cachemw: route-level caching for Starlette and FastAPI, responses first."""

from cachemw.asgi.middleware import CacheMiddleware, CoalescedFailure, invalidate
from cachemw.asgi.routes import build_rule_table
from cachemw.core.entry import Entry
from cachemw.core.policy import PRESETS, ConfigError, Policy, parse_duration
from cachemw.core.rules import RuleTable, cache
from cachemw.core.settings import Settings, load_settings
from cachemw.runtime.invalidation import Invalidator
from cachemw.runtime.supervisor import Supervisor, detach
from cachemw.store import MemoryStore, RedisStore, Store, StoreError
from cachemw.writebehind import VersionConflict, Write, WriteBehind

__all__ = [
    "PRESETS",
    "CacheMiddleware",
    "CoalescedFailure",
    "ConfigError",
    "Entry",
    "Invalidator",
    "MemoryStore",
    "Policy",
    "RedisStore",
    "RuleTable",
    "Settings",
    "Store",
    "StoreError",
    "Supervisor",
    "VersionConflict",
    "Write",
    "WriteBehind",
    "build_rule_table",
    "cache",
    "detach",
    "invalidate",
    "load_settings",
    "parse_duration",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``cachemw.dashboard`` after a plain ``import cachemw``: imported when first used (it needs Starlette's app)."""
    if name == "dashboard":
        import importlib

        return importlib.import_module("cachemw.dashboard")
    raise AttributeError(f"module 'cachemw' has no attribute {name!r}")
