"""MkDocs hook: reference tables generated from the code, so they cannot disagree with validation.

A page marks a table with ``<!-- cachemw:NAME -->`` ... ``<!-- /cachemw:NAME -->``. Inside, the page
keeps only the prose (``| field | meaning |``); the hook adds what the code knows (what a field
accepts, in the words of its validation error, and its default) and fails the build when the page
names a field the code does not have, or leaves one out. ``<!-- cachemw:cli -->`` becomes the
``--help`` of every command, from the argparse parser the ``cachemw`` command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable, Mapping

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

from cachemw.cli import build_parser
from cachemw.core.policy import PRESETS, Policy, field_expectations
from cachemw.core.settings import Settings, setting_expectations

_BLOCK = re.compile(r"<!-- cachemw:(?P<name>[a-z-]+) -->\n(?P<body>.*?)<!-- /cachemw:(?P=name) -->", re.S)
_ROW = re.compile(r"^\| `(?P<key>[a-z0-9_]+)` \| (?P<text>.*) \|$")


def _default(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (frozenset, tuple)):
        items = sorted(value) if isinstance(value, frozenset) else list(value)
        return "`[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in items) + "]`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"`{value}` ({value // (1024 * 1024)} MiB)"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def _rows(body: str, page: str, block: str) -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in body.splitlines()[2:]:  # past the header and the |---| line
        match = _ROW.match(line.strip())
        if not match:
            raise PluginError(f"{page}: {block}: not a '| `field` | text |' row: {line!r}")
        rows[match["key"]] = match["text"]
    return rows


def _fields_table(rows: Mapping[str, str], expected: Mapping[str, str], defaults: Mapping[str, object],
                  page: str, block: str) -> str:
    missing, unknown = sorted(set(expected) - set(rows)), sorted(set(rows) - set(expected))
    if missing or unknown:
        raise PluginError(f"{page}: {block}: the code's fields and the page's differ: not documented {missing}, "
                          f"not in the code {unknown}")
    lines = ["| field | accepts (as validation says it) | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {expected[key]} | {_default(defaults[key])} | {text} |" for key, text in rows.items()]
    return "\n".join(lines) + "\n"


def _settings(body: str, page: str) -> str:
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    return _fields_table(_rows(body, page, "settings"), setting_expectations(), defaults, page, "settings")


def _policy_fields(body: str, page: str) -> str:
    defaults = {f.name: f.default for f in dataclasses.fields(Policy)}
    return _fields_table(_rows(body, page, "policy-fields"), field_expectations(), defaults, page, "policy-fields")


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}"


def _presets(body: str, page: str) -> str:
    rows = _rows(body, page, "presets")
    if set(rows) != set(PRESETS):
        raise PluginError(f"{page}: presets: the page names {sorted(rows)}, the code has {sorted(PRESETS)}")
    lines = ["| preset | `ttl` | `stale_while_revalidate` | `stale_if_error` | for |", "|---|---|---|---|---|"]
    for name, text in rows.items():
        p = PRESETS[name]
        ttl = _duration(p.ttl) + (" (not cached)" if not p.cacheable else "")
        lines.append(f"| `{name}` | {ttl} | {_duration(p.stale_while_revalidate)} | "
                     f"{_duration(p.stale_if_error)} | {text} |")
    return "\n".join(lines) + "\n"


def _cli(body: str, page: str) -> str:
    """``cachemw --help`` and each command's, as the installed command prints them (80 columns)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"  # argparse wraps to the terminal; the page should not depend on the builder's
    try:
        parser = build_parser()
        sections = ["```text\n$ cachemw --help\n" + parser.format_help() + "```\n"]
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for name, sub in actions[0].choices.items():
            sections.append(f"### `cachemw {name}`\n\n```text\n$ cachemw {name} --help\n{sub.format_help()}```\n")
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(sections)


_GENERATORS: dict[str, Callable[[str, str], str]] = {
    "settings": _settings, "policy-fields": _policy_fields, "presets": _presets, "cli": _cli,
}


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    def replace(match: re.Match[str]) -> str:
        generate = _GENERATORS.get(match["name"])
        if generate is None:
            raise PluginError(f"{page.file.src_uri}: unknown generated block {match['name']!r}")
        return generate(match["body"], page.file.src_uri)

    return _BLOCK.sub(replace, markdown)
