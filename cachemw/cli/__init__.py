"""The ``cachemw`` command: what an operator asks of a deployed app's cache.

- ``cachemw routes APP`` (or ``--django SETTINGS``): every route of an app with its effective policy;
- ``cachemw check FILE [--app APP]``: validate a config file (and its rules against an app);
- ``cachemw purge (--tag T | --route R | --url U | --all)``: drop entries from the shared Redis store;
- ``cachemw inspect URL --app APP``: compute a URL's key as the middleware does and show its entry;
- ``cachemw stats``: every live process's counters, added up from Redis (``--watch`` to follow them);
- ``cachemw warm URL...``: GET URLs from a running server, so their entries exist before traffic does;
- ``cachemw writebehind status|dead|retry NAME``: a write-behind queue's backlog and dead letters.

``purge`` and ``inspect`` act on the Redis the configuration names (``--config``,
else the config the app's ``CacheMiddleware`` names), overridden by
``CACHEMW_REDIS_URL`` and then ``--redis-url``. The in-process memory store is out
of their reach. Exit status: 0 done, 1 nothing to show (no policy for a URL), 2 a
usage, configuration or store error.

One module per command (``routes``, ``check``, ``purge``, ``inspect``, ``stats``,
``warm``, ``writebehind``); what they share is in ``common``, ``store`` and ``urls``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cachemw.cli import check, inspect, purge, routes, stats, warm, writebehind
from cachemw.cli.common import CommandFailed, app_write_behinds, load_app
from cachemw.cli.stats import render_stats
from cachemw.core.policy import ConfigError

# load_app, app_write_behinds and render_stats: imported from here before the commands had modules of their own.
__all__ = ["app_write_behinds", "build_parser", "load_app", "main", "render_stats"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cachemw", description="Inspect and operate cachemw caches.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in (routes, check, purge, inspect, stats, warm, writebehind):  # the order of ``cachemw --help``
        command.add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.run(args)
        sys.stdout.flush()  # a closed pipe shows up here, not as a traceback at exit
    except ConfigError as exc:
        print(f"cachemw: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"cachemw: {exc}", file=sys.stderr)
        return exc.status
    except BrokenPipeError:
        # The reader left early (`cachemw routes app | head`); what it read is all it wanted.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
