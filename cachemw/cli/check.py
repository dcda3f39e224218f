"""``cachemw check FILE [--app APP]``: what startup would refuse, found before a deploy."""

from __future__ import annotations

import argparse
import contextlib

import anyio

from cachemw.cli.common import Subcommands, app_table, load_app
from cachemw.core.settings import load_settings
from cachemw.store import StoreError
from cachemw.store.opening import open_store

__all__ = ["add_command"]


def add_command(commands: Subcommands) -> None:
    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("file", help="a cachemw.toml or pyproject.toml")
    check.add_argument("--app", help="also check that every rule matches a route of this app (MODULE:ATTRIBUTE)")
    check.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # What CacheMiddleware.prepare does at startup, short of connecting: the settings, the rule
    # table (with --app) and the store the settings name, made and closed unused.
    settings = load_settings(args.file, environ={})
    if args.app:
        app = load_app(args.app)
        app_table(app, settings)
    store = open_store(settings)
    with contextlib.suppress(StoreError):
        anyio.run(store.aclose)
    print(f"{args.file}: ok ({len(settings.rules)} rule(s), {len(settings.presets)} polic"
          f"{'y' if len(settings.presets) == 1 else 'ies'})")
    return 0
